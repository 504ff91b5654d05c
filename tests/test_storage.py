"""jaxlm.storage on a local directory and on gs:// (a GCS API server started by the test session, tests/gcs.py);
orbax checkpoints, grain iterator states and tensorstore arrays in a bucket."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxlm import storage
from jaxlm.errors import StorageError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    """A fresh directory: a local one, or a prefix in the test bucket."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("gcs")


def test_uris_are_never_local_paths():
    assert storage.is_uri("gs://bucket/run") and storage.is_uri("s3://b/k")
    assert not storage.is_uri("/tmp/run") and not storage.is_uri("runs/gs:/b") and not storage.is_uri("C:\\runs")
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.join("gs://b/run/", "metrics.jsonl") == "gs://b/run/metrics.jsonl"
    assert storage.join("gs://b") == "gs://b"
    assert storage.join("runs", "gs://b/x", "y") == "gs://b/x/y"  # a later URI starts again, as an absolute path does
    assert storage.join("runs", "a", "b.txt") == os.path.join("runs", "a", "b.txt")
    assert storage.join("runs", "/abs") == "/abs"
    with pytest.raises(ValueError, match="absolute path"):
        storage.join("gs://b/run", "/etc/passwd")
    assert storage.abspath("gs://b/run") == "gs://b/run"
    assert storage.abspath("runs/x") == os.path.join(os.getcwd(), "runs", "x")


def test_files(root):
    directory = storage.join(root, "run")
    text_path, bytes_path = storage.join(directory, "config.json"), storage.join(directory, "sub", "blob.bin")
    assert not storage.exists(text_path) and not storage.isdir(directory)
    storage.makedirs(storage.join(directory, "sub"))
    storage.write_text(text_path, '{"é": 1}\n')
    payload = bytes(range(256)) * 3
    storage.write_bytes(bytes_path, payload)

    assert storage.read_text(text_path) == '{"é": 1}\n'
    assert storage.read_bytes(bytes_path) == payload
    assert storage.getsize(bytes_path) == 768 and storage.getsize(text_path) == len('{"é": 1}\n'.encode())
    assert storage.exists(text_path) and storage.isfile(text_path) and not storage.isdir(text_path)
    assert storage.exists(directory) and storage.isdir(directory) and not storage.isfile(directory)
    assert storage.listdir(directory) == ["config.json", "sub"]
    assert storage.listdir(storage.join(directory, "sub")) == ["blob.bin"]

    for missing in (storage.join(directory, "nothing"), text_path):  # no directory, and a file
        with pytest.raises(FileNotFoundError):
            storage.listdir(missing)
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(directory, "nothing.json"))
    with pytest.raises(FileNotFoundError):
        storage.getsize(storage.join(directory, "nothing.json"))

    storage.write_text(text_path, "short")  # overwriting a longer file leaves no tail
    assert storage.read_text(text_path) == "short"

    storage.remove(text_path)
    assert not storage.exists(text_path) and storage.listdir(directory) == ["sub"]
    with pytest.raises(FileNotFoundError):
        storage.remove(text_path)
    storage.rmtree(directory)
    assert not storage.exists(bytes_path) and not storage.isdir(directory)
    with pytest.raises(FileNotFoundError):
        storage.rmtree(directory)
    storage.rmtree(directory, missing_ok=True)


def test_open(root):
    path = storage.join(root, "lines.txt")
    with storage.open(path, "w") as f:
        f.write("one\ntwo\n")
    with storage.open(path) as f:
        assert [line.rstrip("\n") for line in f] == ["one", "two"]
    with storage.open(path, "wb") as f:
        f.write(b"\x00\xff")
    with storage.open(path, "rb") as f:
        assert f.read() == b"\x00\xff"


def test_write_text_atomic(root):
    path = storage.join(root, "summary.json")
    storage.write_text_atomic(path, "first")
    storage.write_text_atomic(path, "second, longer")
    assert storage.read_text(path) == "second, longer"
    with pytest.raises(TypeError):
        storage.write_text_atomic(path, b"not text")  # a write that fails midway keeps the old content
    assert storage.read_text(path) == "second, longer"
    assert storage.listdir(root) == ["summary.json"]  # no temporary file left behind


def test_append_line(root):
    path = storage.join(root, "metrics.jsonl")
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 41)]  # more appends than one compose may join
    for row in rows:
        storage.append_line(path, json.dumps(row))
    assert [json.loads(line) for line in storage.read_text(path).splitlines()] == rows
    assert storage.listdir(root) == ["metrics.jsonl"]  # the uploaded parts are gone
    with pytest.raises(ValueError, match="single line"):
        storage.append_line(path, "two\nlines")


def test_local_copy(root):
    path = storage.join(root, "tokenizer.model")
    storage.write_bytes(path, b"model bytes")
    with storage.local_copy(path) as local:
        assert not storage.is_uri(local)
        with open(local, "rb") as f:
            assert f.read() == b"model bytes"
    if storage.is_uri(path):
        assert not os.path.exists(local)  # the download is removed

    out = storage.join(root, "written.model")
    with storage.local_copy(out, "w") as local, open(local, "wb") as f:
        f.write(b"new model")
    assert storage.read_bytes(out) == b"new model"

    failed = storage.join(root, "failed.model")
    with pytest.raises(RuntimeError), storage.local_copy(failed, "w") as local:
        with open(local, "wb") as f:
            f.write(b"half")
        raise RuntimeError("the library failed")
    assert not storage.exists(failed)


def test_missing_bucket_is_one_clear_error(gcs):
    run = "gs://jaxlm-no-such-bucket/run"
    assert not storage.exists(storage.join(run, "config.json"))
    for call in (
        lambda: storage.makedirs(run),
        lambda: storage.write_text(storage.join(run, "config.json"), "{}"),
        lambda: storage.read_text(storage.join(run, "config.json")),
        lambda: storage.listdir(run),
        lambda: storage.append_line(storage.join(run, "metrics.jsonl"), "{}"),
    ):
        with pytest.raises(StorageError, match="the bucket gs://jaxlm-no-such-bucket does not exist") as info:
            call()
        assert "\n" not in str(info.value)
    # a missing object in a bucket that exists stays a FileNotFoundError
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(gcs, "nothing.json"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_permission_denied_is_one_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StorageError, match="permission denied to write"):
            storage.write_text(str(locked / "config.json"), "{}")
    finally:
        locked.chmod(0o700)


def test_sees_what_other_clients_write(gcs):
    """gcsfs caches listings and sizes: another writer's objects (another host, tensorstore) must still be seen."""
    from google.cloud import storage as gcs_client

    bucket_name, prefix = gcs.removeprefix("gs://").split("/", 1)
    storage.write_text(storage.join(gcs, "a.txt"), "a")
    assert storage.listdir(gcs) == ["a.txt"] and not storage.exists(storage.join(gcs, "b.txt"))

    bucket = gcs_client.Client().bucket(bucket_name)
    bucket.blob(f"{prefix}/b.txt").upload_from_string("b")
    bucket.blob(f"{prefix}/a.txt").upload_from_string("a, rewritten longer")
    assert storage.exists(storage.join(gcs, "b.txt")) and storage.listdir(gcs) == ["a.txt", "b.txt"]
    assert storage.read_text(storage.join(gcs, "a.txt")) == "a, rewritten longer"
    assert storage.getsize(storage.join(gcs, "a.txt")) == len("a, rewritten longer")


def test_folder_placeholders(gcs):
    """The Cloud Console and gcsfuse create a folder as an empty object named `folder/`: it is not in its own listing."""
    from google.cloud import storage as gcs_client

    bucket_name, prefix = gcs.removeprefix("gs://").split("/", 1)
    bucket = gcs_client.Client().bucket(bucket_name)
    bucket.blob(f"{prefix}/run/").upload_from_string(b"")
    assert storage.isdir(storage.join(gcs, "run")) and storage.listdir(storage.join(gcs, "run")) == []
    storage.write_text(storage.join(gcs, "run", "config.json"), "{}")
    assert storage.listdir(storage.join(gcs, "run")) == ["config.json"] and storage.listdir(gcs) == ["run"]


class _IteratorState:
    """A JSON-able state in grain's iterator-state handler, as jaxlm.checkpoint stores the data position."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self):
        return json.dumps(self.state).encode()

    def set_state(self, state):
        self.state = json.loads(state)

    def start_prefetch(self):
        pass


def _bits(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.itemsize in (1, 2, 4, 8) else x


def test_orbax_checkpoints_in_a_bucket(gcs):
    """CheckpointManager handed the gs:// URI itself: async saves, keep-2, latest step, bitwise restore."""
    directory = storage.join(gcs, "run", "checkpoints")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    key = jax.random.key(0)
    state = {
        "params": {
            "w": jax.device_put(jax.random.normal(key, (len(jax.devices()) * 2, 3)), sharded),
            "b": jax.random.normal(key, (5,), jnp.bfloat16),
        },
        "step": jnp.int32(30),
    }

    def manager():
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.LatestN(n=2), enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    writer = manager()
    for step in (10, 20, 30):
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState({"row": step}))
        )
        writer.save(step, args=args, force=True)
    writer.wait_until_finished()
    assert writer.latest_step() == 30 and writer.all_steps() == [20, 30]
    writer.close()
    assert storage.listdir(directory) == ["20", "30"]  # step 10 deleted from the bucket

    reader = manager()  # a resumed run: a new manager over the same URI
    assert reader.latest_step() == 30
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = reader.restore(30, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(_IteratorState())
    ))
    reader.close()
    assert restored["data"].state == {"row": 30}
    assert jax.tree.structure(restored["state"]) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored["state"]), jax.tree.leaves(state)):
        assert got.dtype == want.dtype and got.sharding == want.sharding
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_grain_iterator_state_in_a_bucket(gcs):
    """grain's own handler with a real grain iterator: the restored iterator continues where the saved one was."""
    directory = storage.join(gcs, "data-position")

    def iterator():
        return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())

    it = iterator()
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(directory, item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it).tolist() for _ in range(2)]

    resumed = iterator()
    with ocp.CheckpointManager(directory, item_names=("data",)) as manager:
        assert manager.latest_step() == 3
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert [next(resumed).tolist() for _ in range(2)] == expected
    assert storage.listdir(storage.join(directory, "3", "data")) == ["commit_success.txt", "process_0-of-1.json"]


def test_tensorstore_in_a_bucket(gcs):
    import tensorstore as ts

    bucket, prefix = gcs.removeprefix("gs://").split("/", 1)
    spec = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/array/"}}
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    array = ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result()
    array.write(data).result()
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), data)
    assert ".zarray" in storage.listdir(storage.join(gcs, "array"))
