"""gcp-storage-emulator as tests/gcs.py starts it, with two behaviours of Cloud Storage it lacks.

- Cloud Storage sends `x-goog-generation` with every object it serves; the emulator leaves it out, and
  tensorstore, which orbax writes checkpoints through, then fails to read back an OCDBT manifest ("Malformed
  StorageGeneration"). Downloads here carry the header.
- Cloud Storage honours the preconditions `ifGenerationMatch` and `ifGenerationNotMatch` on uploads and deletes
  (`ifGenerationMatch=0`: only if no live object has the name), answering 412 Precondition Failed
  (https://cloud.google.com/storage/docs/request-preconditions); the emulator ignores them. Here simple and
  multipart uploads and deletes check them, each check and its write one step for concurrent requests.

It starts the emulator's own command line: `python tests/_gcs_emulator.py start ...`.
"""

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


_preconditions = threading.Lock()


def _live_generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # noqa: BLE001  (the emulator's NotFound): no live object, generation "0"
        return "0"


def _with_preconditions(handler, name_of):
    def checked(request, response, storage, *args, **kwargs):
        match = request.query.get("ifGenerationMatch", [None])[0]
        not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        if match is None and not_match is None:
            return handler(request, response, storage, *args, **kwargs)
        with _preconditions:
            live = _live_generation(storage, request.params["bucket_name"], name_of(request))
            if (match is not None and live != match) or (not_match is not None and live == not_match):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                         "did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return None
            return handler(request, response, storage, *args, **kwargs)

    return checked


def _uploaded_name(request) -> str:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or data).get("name", "")


_insert = _with_preconditions(objects.insert, _uploaded_name)
_delete = _with_preconditions(objects.delete, lambda request: request.params["object_id"])

replacements = {objects.download: download, objects.insert: _insert, objects.delete: _delete}
# The JSON API's `?alt=media` reaches the download through objects.get; uploads posted without the /upload prefix
# reach objects.insert by name.
objects.download, objects.insert, objects.delete = download, _insert, _delete
for _, methods in server.HANDLERS:
    for method, handler in methods.items():
        if handler in replacements:
            methods[method] = replacements[handler]

if __name__ == "__main__":
    main(sys.argv[1:])
