"""The S3 server process: moto's server, with its request recorder made fit to persist an object store.

Run as ``python -m cuneiform_stack._moto_server -H 127.0.0.1 -p PORT`` with ``MOTO_ENABLE_RECORDING``
and ``MOTO_RECORDER_FILEPATH`` set; the launcher replays the recording after each start. Three changes
to moto's recorder (moto 5):

- only requests that change state are recorded (reads would grow the file and slow every replay);
- appends are serialized: moto writes each entry in two calls from the server's request threads;
- multipart upload ids are derived from the request that created the upload instead of being random,
  so that the replayed UploadPart and CompleteMultipartUpload requests find their upload again.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from typing import Any

_MUTATING_METHODS = frozenset({"PUT", "POST", "DELETE"})
_request_context = threading.local()
_append_lock = threading.Lock()


def _fingerprint(request: Any) -> str:
    """Identical for a request and its replay: the signature covers the date, the body and the target."""
    headers = request.headers
    signature = headers.get("Authorization") or request.raw_url.split("/", 3)[-1]
    return hashlib.sha256(f"{signature}|{headers.get('X-Amz-Date', '')}".encode()).hexdigest()


def _patch_recorder() -> None:
    from moto.moto_api import recorder
    from moto.s3 import models as s3_models

    record_original = recorder._record_request

    def record_request(request: Any, body: bytes | None = None) -> None:
        # Runs on the request's own thread just before moto handles it, replays included.
        _request_context.fingerprint = _fingerprint(request)
        if request.method in _MUTATING_METHODS:
            with _append_lock:
                record_original(request, body)

    recorder._record_request = record_request  # type: ignore[method-assign]

    multipart_init = s3_models.FakeMultipart.__init__

    def deterministic_multipart_init(self: Any, *args: Any, **kwargs: Any) -> None:
        multipart_init(self, *args, **kwargs)
        fingerprint = getattr(_request_context, "fingerprint", None)
        if fingerprint:
            self.id = fingerprint

    s3_models.FakeMultipart.__init__ = deterministic_multipart_init  # type: ignore[method-assign]


def main() -> None:
    from moto import server

    _patch_recorder()
    # werkzeug logs every request at INFO; keep the log to warnings and errors.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    print(f"moto S3 server {' '.join(sys.argv[1:])}", flush=True)
    server.main(sys.argv[1:])


if __name__ == "__main__":
    main()
