"""A local GCS API server for tests of gs:// paths: gcp-storage-emulator, started once per test session.

`gcs_server` starts it (through tests/_gcs_emulator.py, which adds the generation headers tensorstore reads);
`gcs` points every Google client in this process at it for one test and gives that test a fresh prefix,
`gs://<bucket>/<test name>-<random>`. What each client needs, as environment variables (which also reach the
processes a test starts):

- gcsfs (etils.epath's gs:// backend) and google-cloud-storage (orbax deletes old checkpoints with it):
  STORAGE_EMULATOR_HOST; gcsfs also needs anonymous credentials (FSSPEC_GCS_TOKEN=anon, read when fsspec is
  imported, so this process sets fsspec's config directly) or it looks for real ones.
- tensorstore (orbax's array writer): TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING so that it does
  not look for credentials on a metadata server.
- gcsfs >= 2026.x uses ExtendedGcsFileSystem, which first asks the Storage Control gRPC API for the bucket's type;
  the emulator does not speak gRPC, and each probe waits 60 s before gcsfs falls back, on every call. The
  variable that turns it off, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, is read when gcsfs is imported, so it is
  set here at import time (conftest imports this module), and the plain GCSFileSystem is registered for gs://
  in case gcsfs was imported earlier.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "jaxlm-test"
PROJECT = "jaxlm-test-project"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def client_environment(url: str) -> dict[str, str]:
    """The environment variables that point gcsfs, google-cloud-storage and tensorstore at the server at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_PROJECT": PROJECT,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The URL of a GCS API server holding the (empty) bucket BUCKET, for the whole session."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "_gcs_emulator.py"), "start", "--host",
             "127.0.0.1", "--port", str(port), "--default-bucket", BUCKET, "--in-memory"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/storage/v1/b/{BUCKET}"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the GCS emulator did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def gcs(gcs_server, monkeypatch, request):
    """A fresh `gs://BUCKET/<test>-<random>` prefix, with this process's Google clients pointed at the server."""
    import fsspec
    import gcsfs.core

    for name, value in client_environment(gcs_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon", "project": PROJECT})
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]
    yield f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
