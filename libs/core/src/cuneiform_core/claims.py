"""Reading a claim-checked event body from the NATS object store, verified against its claim.

The recorder (which stores the body) and the archiver (which keeps it in the cold copy) both read
claim checks; both need the same guarantees: the bucket is this deployment's, the size is announced
and bounded before anything is downloaded, the read has a deadline, and the bytes match the digest.
"""

from __future__ import annotations

import asyncio
import hashlib

from cuneiform_sdk.contract import PayloadRef
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .runtime import PermanentError, TransientError

#: nats-py's object read has no deadline of its own (it can wait forever on chunks that a concurrent
#: re-upload purged): bounded here, and a timeout is retried later.
READ_TIMEOUT_S = 30.0


async def read_claim_body(js: JetStreamContext, ref: PayloadRef, *, expected_bucket: str, max_bytes: int) -> bytes:
    """The body a claim check points at; ``PermanentError`` when it can never be read as announced."""
    if ref.bucket != expected_bucket:
        raise PermanentError(f"claim check names bucket {ref.bucket!r}; payloads live in {expected_bucket!r}")
    if ref.size > max_bytes:
        raise PermanentError(f"oversize: claim-checked event of {ref.size} bytes exceeds the limit of {max_bytes}")
    try:
        store = await js.object_store(ref.bucket)
        info = await store.get_info(ref.name)
        if info.size != ref.size:  # checked before reading: never download more than announced
            raise PermanentError(
                f"claim check size mismatch: object {ref.bucket}/{ref.name} has {info.size} bytes, "
                f"the event announced {ref.size}"
            )
        body = (await asyncio.wait_for(store.get(ref.name), READ_TIMEOUT_S)).data or b""
    except NotFoundError:
        raise PermanentError(f"claim check names object {ref.bucket}/{ref.name}, which does not exist") from None
    except TimeoutError:
        raise TransientError(f"reading claim-checked object {ref.bucket}/{ref.name} timed out") from None
    digest = hashlib.sha256(body).hexdigest()
    if digest != ref.sha256 or len(body) != ref.size:
        raise PermanentError(
            f"claim check digest mismatch: object {ref.bucket}/{ref.name} has sha256 {digest} and "
            f"{len(body)} bytes, the event announced {ref.sha256} and {ref.size}"
        )
    return body
