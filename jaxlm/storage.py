"""Paths that may be local or cloud URIs (`gs://bucket/run`), through etils.epath.

Every path jaxlm reads or writes goes through these helpers, so a run directory, a corpus or a tokenizer may live
on local disk or in a bucket. A URI is never handed to `os.path` (`os.path.abspath("gs://b/run")` is
`$PWD/gs:/b/run`).

What differs on Cloud Storage, and how these helpers deal with it:

- There are no directories, only objects whose names share a prefix: `makedirs` checks that the bucket exists
  and creates nothing (gcsfs would create a missing bucket); a directory exists once an object is under it.
- A single object upload is atomic (readers see the old object or the new one), so `write_text_atomic` is a plain
  upload there; locally it writes a temporary file and renames it.
- Objects cannot be appended to: `append_line` uploads the line as a small object and composes the two server-side
  (https://cloud.google.com/storage/docs/composite-objects), so appending costs the line, not the whole file. It
  assumes one writer per file, as jaxlm's metrics files have (process 0).
- gcsfs caches directory listings and object sizes per process, which goes stale when another process or client
  (tensorstore, another host) writes: each helper forgets the cached listings of the path it is given first.
- A write that raises uploads nothing: the old object, if any, stays.
- A missing bucket, a permission error, and a full disk become a one-line `StorageError`; a missing file stays a
  `FileNotFoundError`, as it is locally.

etils reaches gs:// through gcsfs (fsspec) when TensorFlow is not installed, and through tf.io.gfile when it is.
Credentials and endpoints are what the Google clients read themselves: application default credentials, and
`STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage) or `TENSORSTORE_GCS_HTTP_URL` (tensorstore, orbax's
arrays) for a local GCS API server.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import glob as globlib
import io
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from jaxlm.errors import StorageError, StorageUnavailableError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI such as `gs://bucket/dir` (rather than a local path)."""
    return bool(_URI.match(os.fspath(path)))


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def join(*parts: str | os.PathLike) -> str:
    """Join path components like os.path.join; a URI is joined with '/' and keeps its `scheme://`.

    As with os.path.join, a later URI or absolute local path starts the path again; an absolute local path after a
    URI is an error rather than a silent jump to the local disk.
    """
    if not parts:
        raise TypeError("join() needs at least one part")
    texts = [os.fspath(p) for p in parts]
    start = max((i for i, t in enumerate(texts) if is_uri(t)), default=None)
    if start is None:
        return os.path.join(*texts)
    base, rest = texts[start], texts[start + 1 :]
    for part in rest:
        if part.startswith("/"):
            raise ValueError(f"cannot join the absolute path {part!r} to the URI {base!r}")
    return posixpath.join(base, *rest) if rest else base


def abspath(path: str | os.PathLike) -> str:
    """os.path.abspath for local paths; a URI is returned as it is."""
    text = os.fspath(path)
    return text if is_uri(text) else os.path.abspath(text)


def dirname(path: str | os.PathLike) -> str:
    """os.path.dirname for local paths; for a URI, the part before its last '/' (never above `scheme://bucket`)."""
    text = os.fspath(path)
    if not is_uri(text):
        return os.path.dirname(text)
    scheme, rest = text.split("://", 1)
    rest = rest.rstrip("/")
    return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else text


def basename(path: str | os.PathLike) -> str:
    """os.path.basename for local paths; for a URI, the part after its last '/' (a trailing '/' ignored)."""
    text = os.fspath(path)
    return posixpath.basename(text.rstrip("/")) if is_uri(text) else os.path.basename(text)


def _bucket(path: str) -> str:
    return path[len("gs://") :].split("/", 1)[0]


def _gcs() -> Any:
    """The gcsfs filesystem etils uses for gs:// (fsspec returns one cached instance for the same arguments)."""
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def _forget_listings(path: str) -> None:
    """Drop gcsfs's cached listings of `path` and its parents, so that others' writes are seen."""
    if _is_gcs(path):
        _gcs().invalidate_cache(path)


def _forbidden(e: BaseException) -> bool:
    if isinstance(e, PermissionError):
        return True
    code = getattr(e, "code", None)  # gcsfs HttpError, google.api_core exceptions
    if code in (401, 403):
        return True
    text = str(e)
    return type(e) is OSError and text.startswith(("Forbidden", "Unauthorized"))  # gcsfs: 403 -> OSError


_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _unreachable(e: BaseException) -> bool:
    """A failure to reach the storage service (after the client's own retries), rather than a refusal by it."""
    if isinstance(e, TimeoutError) or (isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS):
        return True
    if type(e).__name__ in ("ClientConnectorError", "ServerDisconnectedError", "ClientConnectionError"):
        return True  # aiohttp, under gcsfs
    code = getattr(e, "code", None)
    return isinstance(code, int) and (code == 429 or 500 <= code < 600)


def as_storage_error(path: str, action: str, e: BaseException) -> StorageError | None:
    """The StorageError that `e` (raised while doing `action` on `path`) stands for, or None to let it pass."""
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if _forbidden(e):
        where = f"the bucket gs://{_bucket(path)}" if _is_gcs(path) else "it"
        return StorageError(
            f"permission denied to {action} {path} ({first_line}): give this machine's credentials access to "
            f"{where}, or choose another path"
        )
    code = e.errno if isinstance(e, OSError) else _os_error_code(str(e))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left to {action} {path}: free some space or choose another path")
    if code == errno.EROFS:
        return StorageError(f"cannot {action} {path}: its file system is read-only; choose a writable path")
    if code == errno.EACCES:
        return StorageError(f"permission denied to {action} {path}: make it writable or choose another path")
    if isinstance(e, FileNotFoundError) and _is_gcs(path):
        try:
            bucket_exists = _gcs().exists(_bucket(path))
        except Exception as check:  # noqa: BLE001  (a bucket we may not even look at)
            return as_storage_error(path, action, check) if _forbidden(check) else None
        if not bucket_exists:
            return StorageError(
                f"the bucket gs://{_bucket(path)} does not exist (cannot {action} {path}): create it "
                f"(`gcloud storage buckets create gs://{_bucket(path)}`) or correct the path"
            )
    if _unreachable(e):
        where = f"the bucket gs://{_bucket(path)}" if _is_gcs(path) else path
        return StorageUnavailableError(
            f"cannot reach {where} to {action} {path} ({first_line}): check the network, then rerun the same "
            "command (a run resumes from its last checkpoint)"
        )
    if type(e).__name__ == "DefaultCredentialsError":
        return StorageError(
            f"no Google Cloud credentials to {action} {path}: run `gcloud auth application-default login`, or run "
            "on a VM whose service account may use the bucket"
        )
    return None


def _os_error_code(text: str) -> int | None:
    """The errno in an error of a library that reports it in words (tensorstore: `[os_error_code='28']`)."""
    found = re.search(r"os_error_code='?(\d+)", text)
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def io_errors(path: str, action: str) -> Iterator[None]:
    """Errors a user can fix (permissions, a full or read-only disk, a missing bucket, credentials) raised in the
    block, as one-line StorageErrors saying what could not be done to `path`; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        error = as_storage_error(path, action, e)
        if error is None:
            raise
        raise error from None


def _path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    with io_errors(path, "read"):
        _forget_listings(path)
        return _path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory; on Cloud Storage, whether any object's name starts with `path/`."""
    path = os.fspath(path)
    with io_errors(path, "read"):
        _forget_listings(path)
        return _path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    with io_errors(path, "read"):
        _forget_listings(path)
        return _path(path).is_file()


def listdir(path: str | os.PathLike) -> list[str]:
    """The names (not paths) in a directory, sorted; FileNotFoundError when there is none."""
    path = os.fspath(path)
    with io_errors(path, "list"):
        _forget_listings(path)
        if not _path(path).is_dir():  # gcsfs lists a file as itself
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        if not _is_gcs(path):
            return sorted({p.name for p in _path(path).iterdir()})
        # The console and gcsfuse mark a folder with an empty object `dir/`, which gcsfs lists inside `dir`.
        itself = path[len("gs://") :].rstrip("/")
        entries = (entry.rstrip("/") for entry in _gcs().ls(path, detail=False))
        return sorted({entry.rsplit("/", 1)[-1] for entry in entries if entry != itself})


def glob(pattern: str) -> list[tuple[str, int]]:
    """The files matching a glob (`*`, `?`, `[..]`, `**` for any depth), local or gs://, with their sizes, sorted.

    On Cloud Storage one listing gives the names and sizes, rather than a request per file.
    """
    pattern = os.fspath(pattern)
    with io_errors(pattern, "list"):
        if _is_gcs(pattern):
            _forget_listings(pattern.split("*", 1)[0].rsplit("/", 1)[0])
            found = _gcs().glob(pattern, detail=True)
            return sorted(
                (f"gs://{name}", int(info.get("size") or 0)) for name, info in found.items()
                if info.get("type") == "file"
            )
        if is_uri(pattern):
            raise StorageError(f"{pattern}: only local paths and gs:// URIs can be globbed; copy the files to one of them")
        paths = globlib.glob(os.path.expanduser(pattern), recursive=True)
        return sorted((p, os.path.getsize(p)) for p in paths if os.path.isfile(p))


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory and its parents (existing ones are fine); on Cloud Storage, check the bucket.

    Cloud Storage has no directories to create; gcsfs would create a missing bucket, which for a misspelt path is
    the wrong thing to do.
    """
    path = os.fspath(path)
    with io_errors(path, "create"):
        if _is_gcs(path):
            if not _gcs().exists(_bucket(path)):
                raise FileNotFoundError(errno.ENOENT, "no such bucket", path)
        elif is_uri(path):
            _path(path).mkdir(parents=True, exist_ok=True)
        else:
            os.makedirs(path, exist_ok=True)


def open(path: str | os.PathLike, mode: str = "r") -> contextlib.AbstractContextManager[IO[Any]]:
    """Open a file to read ('r', 'rb'), write ('w', 'wb') or, locally, append ('a', 'ab'); use it in a `with`.

    Text is UTF-8. A written file appears whole when the block ends, and not at all when it raises (the old file,
    if any, stays): locally it is written under a temporary name and renamed; on Cloud Storage it is uploaded
    then. Appending to an object is `append_line`.
    """
    if mode not in ("r", "rb", "w", "wb", "a", "ab"):
        raise ValueError(f"storage.open mode is one of r, rb, w, wb, a, ab, not {mode!r}")
    path = os.fspath(path)
    if "a" in mode and is_uri(path):
        raise ValueError(f"cannot append to {path}: objects in cloud storage are written whole; use append_line")
    return _open(path, mode)


@contextlib.contextmanager
def _open(path: str, mode: str) -> Iterator[IO[Any]]:
    with io_errors(path, "read" if "r" in mode else "write"):
        _forget_listings(path)
        encoding = None if "b" in mode else "utf-8"
        if not is_uri(path) and mode in ("w", "wb"):
            # A temporary file renamed over `path` once complete: readers and a crash see all of it or none.
            tmp = _temporary_name(path)
            try:
                with builtins.open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            return
        if not _is_gcs(path):
            with (_path(path).open(mode) if is_uri(path) else builtins.open(path, mode, encoding=encoding)) as f:
                yield f
            return
        raw = _gcs().open(path, mode[0] + "b")
        f = raw if encoding is None else io.TextIOWrapper(raw, encoding=encoding)
        if "r" in mode:
            with f:
                yield f
            return
        try:
            yield f
        except BaseException:
            # Closing a gcsfs file uploads what was written: cancel the upload instead.
            with contextlib.suppress(Exception):
                if f is not raw:
                    f.flush()
                raw.discard()
            raw.closed = True
            f.close()
            raise
        f.close()
        _forget_listings(path)


def read_text(path: str | os.PathLike) -> str:
    with open(path, "r") as f:
        return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_text(path: str | os.PathLike, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _temporary_name(path: str) -> str:
    """A name beside `path` for a file that will replace it (the same file system, so the rename is atomic)."""
    return f"{path}.{uuid.uuid4().hex[:8]}.tmp"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a file's content so that readers (and a crash) see the old content or the new, never a part: what
    every write through `open` does (locally a temporary file renamed over it; on Cloud Storage one upload)."""
    write_text(path, text)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) to a text file, creating it if needed.

    On Cloud Storage the line is uploaded as a small object that is then composed onto the end of the file on the
    server, so each append moves only the line. One writer per file: two processes appending at once can lose a
    line.
    """
    path = os.fspath(path)
    if "\n" in line:
        raise ValueError(f"append_line takes a single line, not {line!r}")
    data = (line + "\n").encode()
    with io_errors(path, "write"):
        if not _is_gcs(path):
            if is_uri(path):
                raise StorageError(f"{path}: only local paths and gs:// URIs can be appended to; use one of them for the run")
            with builtins.open(path, "ab") as f:
                f.write(data)
            return
        fs = _gcs()
        fs.invalidate_cache(path)
        if not fs.exists(path):
            fs.pipe_file(path, data)
            return
        part = f"{path}.append-{uuid.uuid4().hex}"
        fs.pipe_file(part, data)
        try:
            fs.merge(path, [path, part])
        finally:
            fs.rm_file(part)
            fs.invalidate_cache(path)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create a file holding `text` unless one exists: True if this call created it, False if it existed.

    Among concurrent callers exactly one creates it: locally through O_EXCL, on Cloud Storage through an upload
    with the precondition ifGenerationMatch=0 (only if no live object has the name), which the server checks.
    """
    path = os.fspath(path)
    data = text.encode("utf-8")
    with io_errors(path, "write"):
        if _is_gcs(path):
            try:
                _gcs().pipe_file(path, data, mode="create")
            except FileExistsError:  # gcsfs: 412 Precondition Failed
                return False
            finally:
                _forget_listings(path)
            return True
        if is_uri(path):
            raise StorageError(f"{path}: only local paths and gs:// URIs can be used for a run")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with builtins.open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True


def _object(path: str) -> tuple[str, str]:
    bucket, _, key = path[len("gs://") :].partition("/")
    return bucket, key


def read_generation(path: str) -> tuple[str, int]:
    """A Cloud Storage object's text and generation (FileNotFoundError if there is none)."""
    with io_errors(path, "read"):
        headers, content = _gcs().call("GET", "b/{}/o/{}", *_object(path), alt="media")
        return content.decode("utf-8", errors="replace"), int(headers["x-goog-generation"])


def replace_if_generation(path: str, text: str, generation: int) -> int | None:
    """Upload `text` over a Cloud Storage object only while its generation is `generation`; the new generation,
    or None when the object has changed or gone since."""
    bucket, key = _object(path)
    gcs = _gcs()
    with io_errors(path, "write"):
        try:
            reply = gcs.call(
                "POST", gcs.base.replace("/storage/v1/", "/upload/storage/v1/") + "b/{}/o", bucket, uploadType="media",
                name=key,
                ifGenerationMatch=str(generation), data=text.encode("utf-8"), json_out=True,
                headers={"Content-Type": "application/octet-stream"},
            )
        except (FileExistsError, FileNotFoundError):
            return None
        finally:
            _forget_listings(path)
        return int(reply["generation"])


def remove_if_generation(path: str, generation: int) -> bool:
    """Delete a Cloud Storage object only while its generation is `generation`: whether this call deleted it."""
    with io_errors(path, "delete"):
        try:
            _gcs().call("DELETE", "b/{}/o/{}", *_object(path), ifGenerationMatch=str(generation))
        except (FileExistsError, FileNotFoundError):
            return False
        finally:
            _forget_listings(path)
        return True


def getsize(path: str | os.PathLike) -> int:
    """A file's size in bytes."""
    path = os.fspath(path)
    with io_errors(path, "read"):
        _forget_listings(path)
        if not is_uri(path):
            return os.path.getsize(path)
        size = _path(path).stat().length
        if size is None:
            raise IsADirectoryError(errno.EISDIR, "a directory has no size", path)
        return int(size)


def remove(path: str | os.PathLike) -> None:
    """Delete a file (FileNotFoundError if there is none)."""
    path = os.fspath(path)
    with io_errors(path, "delete"):
        _forget_listings(path)
        if is_uri(path):
            if not _path(path).is_file():
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            _path(path).unlink()
        else:
            os.remove(path)
        _forget_listings(path)


def rmtree(path: str | os.PathLike, missing_ok: bool = False) -> None:
    """Delete a directory and everything under it."""
    path = os.fspath(path)
    with io_errors(path, "delete"):
        _forget_listings(path)
        if is_uri(path):
            if not _path(path).is_dir():
                if missing_ok:
                    return
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            _path(path).rmtree()
        else:
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise
        _forget_listings(path)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, mode: str = "r") -> Iterator[str]:
    """A local filename for `path`, for libraries that only take one (sentencepiece's model file, say).

    mode 'r': a local file with `path`'s content (a local path is given as it is; a URI is downloaded into a
    temporary directory). mode 'w': a local file to write, which becomes `path` (renamed or uploaded) when the block
    ends without an error; when it raises, `path` is left as it was.
    """
    if mode not in ("r", "w"):
        raise ValueError(f"local_copy mode is 'r' or 'w', not {mode!r}")
    path = os.fspath(path)
    if not is_uri(path) and mode == "r":
        yield path
        return
    if not is_uri(path):
        tmp = _temporary_name(path)
        try:
            yield tmp
            with io_errors(path, "write"):
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="jaxlm-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path.rstrip("/")) or "file")
        if mode == "r":
            with open(path, "rb") as src, builtins.open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        yield local
        if mode == "w":
            with builtins.open(local, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
