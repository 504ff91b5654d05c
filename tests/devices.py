"""Fewer devices for in-process runs that are not about sharding."""


def use_first_devices(monkeypatch, n: int) -> None:
    """Meshes built without a device list take the session's first `n` CPU devices instead of all eight
    (conftest.py): a tiny run split eight ways spends more time compiling and synchronising than computing."""
    import jax

    from jaxlm import sharding

    make_mesh = sharding.make_mesh
    monkeypatch.setattr(
        sharding, "make_mesh", lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:n] if devices is None else devices)
    )
