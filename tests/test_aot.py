"""tools.aot: TPU topologies by name, collectives read off compiled programs, and train steps compiled for real TPU
slices by libtpu on this CPU (no TPU needed)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm import aot, flops
from jaxlm.errors import ConfigError


# Slice shapes from the Cloud TPU docs' configuration tables (v5p, v4: TensorCores in the name, two per chip).
@pytest.mark.parametrize("name, expected", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
    ("v5p-128", "v5p:4x4x4"), ("v5p-256", "v5p:4x4x8"), ("v4-32", "v4:2x2x4"), ("v4-128", "v4:4x4x4"),
    ("v5e-1", "v5e:1x1"), ("v5litepod-4", "v5e:2x2"), ("v5e-8", "v5e:2x4"), ("v5e-16", "v5e:4x4"),
    ("v5e-256", "v5e:16x16"), ("v6e-8", "v6e:2x4"), ("v6e-64", "v6e:8x8"), ("v5p:2x2x1", "v5p:2x2x1"),
    ("V5E:2x2", "v5e:2x2"),
])
def test_accelerator_types_name_the_cloud_tpu_slices(name, expected):
    assert aot.jax_topology_name(name) == expected


@pytest.mark.parametrize("name", ["v5p-4", "v5p-12", "v5e-2", "v5e-12", "v7-8", "tpu", "v5p:2x2", "h100"])
def test_a_bad_topology_is_one_line_listing_what_works(name):
    with pytest.raises(ConfigError) as info:
        aot.jax_topology_name(name)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message and "v5p-8" in message and "v5p:2x2x1" in message


def test_the_chip_table_tells_gpus_apart_by_their_datasheets():
    # jax.Device.device_kind strings as CUDA reports them.
    assert flops.chip("NVIDIA H100 80GB HBM3").bf16_flops == 989e12  # SXM
    assert flops.chip("NVIDIA H100 PCIe").bf16_flops == 756e12
    assert flops.chip("NVIDIA H200").hbm_bytes == 141e9
    assert flops.chip("NVIDIA A100-SXM4-40GB").hbm_bytes == 40e9
    assert flops.chip("NVIDIA A100-SXM4-80GB").hbm_bytes == 80e9
    assert flops.chip("NVIDIA L4").bf16_flops == 121e12
    assert flops.chip("TPU v5 lite").hbm_bytes == 16 * 2**30 and flops.chip("TPU v5p").bf16_flops == 459e12
    assert flops.chip("cpu") is None


def test_collectives_are_counted_per_execution_with_loop_trip_counts():
    mesh = jax.make_mesh((8,), ("x",))
    steps = 5

    def body(i, carry):
        a, b = carry
        total = jax.lax.psum(a, "x")  # all-reduce of this device's f32[4, 256]: 4 KiB
        gathered = jax.lax.all_gather(b, "x", tiled=True)  # f32[2, 128] -> f32[16, 128]: 8 KiB gathered
        scattered = jax.lax.psum_scatter(gathered, "x", tiled=True)  # 8 KiB reduced and scattered
        return total * 0.5, scattered * 0.5

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x")), check_vma=False)
    def looped(a, b):
        return jax.lax.fori_loop(0, steps, body, (a, b))

    split = NamedSharding(mesh, P("x"))
    hlo = looped.lower(
        jax.ShapeDtypeStruct((32, 256), jnp.float32, sharding=split),
        jax.ShapeDtypeStruct((16, 128), jnp.float32, sharding=split),
    ).compile().as_text()
    assert aot.collectives(hlo) == {
        "all-reduce": {"count": steps, "bytes": steps * 4 * 256 * 4},
        "all-gather": {"count": steps, "bytes": steps * 16 * 128 * 4},
        "reduce-scatter": {"count": steps, "bytes": steps * 16 * 128 * 4},
    }


# --------------------------------------------------------------------------- compiled for TPU slices by libtpu

TINY = ["--model.n-layers", "2", "--model.d-model", "128", "--model.n-heads", "4", "--model.vocab-size", "512",
        "--data.vocab-size", "512", "--model.max-seq-len", "128", "--data.seq-len", "128", "--data.batch-size", "8",
        "--model.dtype", "bfloat16"]


def _aot(capsys, *argv: str) -> list[dict]:
    from tools import aot as aot_tool

    aot_tool.main(list(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _check_sharded_step(record: dict, *, devices: int, hosts: int, mesh: dict, n_layers: int = 2, d_model: int = 128,
                        vocab: int = 512) -> None:
    assert (record["devices"], record["hosts"], record["mesh"]) == (devices, hosts, mesh)
    assert record["attention"] == "splash (Pallas)"  # attention auto, for TPU devices
    memory = record["bytes_per_device"]
    # The arguments hold each device's shards of the float32 parameters and two Adam moments (12 bytes per
    # parameter in all): FSDP x tensor splits them over `shards` devices, replicas hold copies.
    state = 12 * record["params"]
    shards = mesh["fsdp"] * mesh["tensor"]
    assert state / shards <= memory["arguments"] < 1.5 * state / shards
    # Donated, the new state reuses the old one's buffers.
    assert 0.9 * state / shards < memory["aliased"] <= memory["arguments"]
    assert memory["total"] >= memory["arguments"] and memory["total"] < record["hbm_per_device"] and record["fits"]
    c = record["collectives"]
    # FSDP: every layer's weights gathered (forward and backward) and the gradients reduced back to their shards;
    # tensor parallelism: the partial sums of split heads and MLP width all-reduced.
    assert c["all-gather"]["count"] >= n_layers and c["all-gather"]["bytes"] > 0
    assert c["reduce-scatter"]["count"] + c["all-reduce"]["count"] >= n_layers
    assert c["all-reduce"]["count"] > 0
    # The compiler counts the whole step over every chip: at least the output layer's matmuls (forward and
    # backward, outside the scanned layers), at most the model's count with the attention square it leaves out.
    flops_step = record["flops_per_step"]
    head = 6 * record["batch_size"] * record["seq_len"] * d_model * vocab
    assert head < flops_step["compiler"] < 1.5 * flops_step["model"], flops_step
    bounds = record["bounds"]
    assert bounds["step_s_lower_bound"] > 0 and 0 < bounds["mfu_upper_bound"] <= 1
    assert "not measurements" in bounds["basis"]


@pytest.mark.slow
def test_llama_train_step_compiles_for_one_v5e_host(capsys):
    (train,) = _aot(capsys, "--experiment", "quickstart", "--topology", "v5e:2x2", "--train-only", *TINY,
                    "--model.n-kv-heads", "2", "--mesh.data", "1", "--mesh.fsdp", "2", "--mesh.tensor", "2")
    assert train["chip"] == "TPU v5 lite" and train["hbm_per_device"] == 16 * 2**30
    _check_sharded_step(train, devices=4, hosts=1, mesh={"data": 1, "fsdp": 2, "tensor": 2})


@pytest.mark.slow
def test_gpt2_train_step_compiles_for_two_v5p_hosts(capsys):
    (train,) = _aot(capsys, "--experiment", "quickstart_gpt2", "--topology", "v5p:2x2x2", "--train-only", *TINY,
                    "--mesh.data", "2", "--mesh.fsdp", "2", "--mesh.tensor", "2")
    assert train["chip"].startswith("TPU v5") and train["hbm_per_device"] == 95 * 2**30
    _check_sharded_step(train, devices=8, hosts=2, mesh={"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("argv, lists", [
    (["--experiment", "nope", "--topology", "v5e-4"], "quickstart"),
    (["--experiment", "quickstart", "--topology", "v5p-6"], "v5p-8"),
])
def test_the_tool_refuses_bad_names_in_one_line(capsys, argv, lists):
    from tools import aot as aot_tool

    with pytest.raises(SystemExit) as info:
        aot_tool.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and lists in err[0]
