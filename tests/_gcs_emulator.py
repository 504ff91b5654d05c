"""gcp-storage-emulator as tests/gcs.py starts it, answering media downloads with their object's generation.

Cloud Storage sends `x-goog-generation` with every object it serves; the emulator leaves it out, and tensorstore,
which orbax writes checkpoints through, then fails to read back an OCDBT manifest ("Malformed StorageGeneration").
This adds the header and starts the emulator's own command line: `python tests/_gcs_emulator.py start ...`.
"""

import sys
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


objects.download = download  # the JSON API's `?alt=media` reaches it through objects.get
for _, methods in server.HANDLERS:
    for method, handler in methods.items():
        if handler is _download:
            methods[method] = download

if __name__ == "__main__":
    main(sys.argv[1:])
