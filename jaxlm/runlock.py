"""One writer per run directory: a lock taken when a run starts and given back when it ends.

Two processes training into one run directory would write every metrics row twice, or leave config.json saying
one thing while the checkpoints hold another. The lock is `<run_dir>/writer.lock`, a JSON record of its holder
(host, pid, since):

- Locally it is held with flock(2), which the kernel gives back when the holder dies however it dies, so a crash
  leaves nothing to clean up. The file stays; its record names the last holder.
- On Cloud Storage it is an object created only if absent (the precondition ifGenerationMatch=0), a lease that
  the holder renews every RENEW_S seconds (an upload conditional on the generation it wrote last). A lock whose
  holder is gone is taken over: one of this host whose process no longer exists, or one not renewed for LEASE_S
  (a preempted VM). Taking over deletes the object only at the generation that was judged stale, so of two
  processes taking over at once one wins and the other sees the winner's fresh lock.

A second process gets one line naming the holder. With several processes per run, process 0 holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from typing import Any

from jaxlm import storage
from jaxlm.errors import CheckpointError, RunInUseError

LOCK_FILE = "writer.lock"
LEASE_S = 300.0  # a Cloud Storage lock not renewed for this long is stale
RENEW_S = 60.0


def _record() -> dict[str, Any]:
    now = time.time()
    since = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since, "renewed": now}


def _parse(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict[str, Any]) -> str:
    if not record:
        return "a process that has not yet said which"
    return f"host {record.get('host')}, pid {record.get('pid')}, since {record.get('since')}"


def _refusal(run_dir: str, record: dict[str, Any]) -> RunInUseError:
    return RunInUseError(
        f"{run_dir} is in use by another run ({_holder(record)}): wait for it to end or stop it, or use another "
        "--train.out-dir"
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(record: dict[str, Any], now: float) -> bool:
    """Whether a Cloud Storage lock's holder is gone: a process of this host that no longer exists, or a lease
    that was not renewed in time (records this code cannot read count as renewed when written)."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        if not _process_exists(record["pid"]):
            return True
    renewed = record.get("renewed")
    return isinstance(renewed, (int, float)) and now - renewed > LEASE_S


class RunLock:
    """The run directory's writer lock; `acquire` raises RunInUseError naming the holder, `release` gives it back."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = storage.join(run_dir, LOCK_FILE)
        self.took_over: dict[str, Any] | None = None  # the record of a dead holder this lock replaced
        self._fd: int | None = None
        self._generation: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- local disk

    def _acquire_local(self) -> None:
        import fcntl

        with storage.io_errors(self.path, "write"):  # a read-only directory: one line, not a traceback
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = {}
            for _ in range(20):  # the holder writes its record just after taking the lock
                record = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))
                if record:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise _refusal(self.run_dir, record) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))
        self.took_over = previous or None
        data = json.dumps(_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def _release_local(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty record: nobody holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # ---------------------------------------------------------------------------------------- cloud storage

    def _acquire_gcs(self) -> None:
        for _ in range(5):
            if storage.create_exclusive(self.path, json.dumps(_record())):
                _, self._generation = storage.read_generation(self.path)
                self._renewer = threading.Thread(target=self._renew, name="jaxlm-run-lock", daemon=True)
                self._renewer.start()
                return
            try:
                text, generation = storage.read_generation(self.path)
            except FileNotFoundError:
                continue  # released in between: try again
            record = _parse(text)
            if not _stale(record, time.time()):
                raise _refusal(self.run_dir, record)
            if storage.remove_if_generation(self.path, generation):
                self.took_over = record
        raise _refusal(self.run_dir, {})

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease allows several
                record = {**_parse(storage.read_generation(self.path)[0]), "renewed": time.time()}
                generation = storage.replace_if_generation(self.path, json.dumps(record), self._generation)
                if generation is None:
                    return  # taken over: this process no longer holds it
                self._generation = generation

    def _release_gcs(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        generation, self._generation = self._generation, None
        if generation is not None:
            storage.remove_if_generation(self.path, generation)

    # ------------------------------------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        try:
            storage.makedirs(self.run_dir)
        except OSError as e:
            raise CheckpointError(
                f"cannot create the run directory {self.run_dir} ({e.strerror}): choose another --train.out-dir"
            ) from None
        if storage.is_uri(self.path):
            self._acquire_gcs()
        else:
            self._acquire_local()
        if self.took_over:
            print(f"{self.run_dir}: took over the lock of a run that has ended ({_holder(self.took_over)})")
        return self

    def release(self) -> None:
        if self._fd is not None:
            self._release_local()
        elif self._generation is not None:
            self._release_gcs()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
