"""The object store (S3 API: MinIO in compose, moto in the embedded stack, any S3 in production).

The minio client is synchronous; every call runs in a worker thread so the event loop never blocks
on the network. Keys are always chosen by the caller deterministically (a retried write lands on the
same key), and every put records the body's sha256 in the object's metadata so readers can verify.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from .settings import ConnectionSettings

SHA256_META = "sha256"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    sha256: str | None


class ObjectStore:
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
    ) -> None:
        # Short connect timeout and bounded retries: an outage surfaces as an error the caller can
        # retry with backoff, instead of a thread stuck for minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            maxsize=16,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self._client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: ConnectionSettings, bucket: str | None = None) -> ObjectStore:
        return cls(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            bucket or settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    async def ensure_bucket(self) -> None:
        def create() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as error:  # another replica won the race
                    if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(create)

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        result = await asyncio.to_thread(
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={SHA256_META: digest},
        )
        return ObjectInfo(key=key, size=len(data), etag=result.etag or "", sha256=digest)

    async def put_file(
        self, key: str, path: str | os.PathLike[str], sha256: str, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Upload a file (multipart from 5 MiB, streamed from disk); the caller hashed it while writing."""
        size = await asyncio.to_thread(os.path.getsize, path)
        result = await asyncio.to_thread(
            self._client.fput_object,
            self.bucket,
            key,
            os.fspath(path),
            content_type=content_type,
            metadata={SHA256_META: sha256},
        )
        return ObjectInfo(key=key, size=size, etag=result.etag or "", sha256=sha256)

    async def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await asyncio.to_thread(read)

    async def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and recorded sha256, or None when there is no such object."""

        def head() -> ObjectInfo | None:
            try:
                info = self._client.stat_object(self.bucket, key)
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return None
                raise
            meta = {k.lower(): v for k, v in (info.metadata or {}).items()}
            sha = meta.get(f"x-amz-meta-{SHA256_META}")
            return ObjectInfo(key=key, size=info.size or 0, etag=info.etag or "", sha256=sha)

        return await asyncio.to_thread(head)

    async def list_keys(self, prefix: str = "") -> list[str]:
        def listing() -> list[str]:
            objects: Iterable[Any] = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name is not None)

        return await asyncio.to_thread(listing)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.remove_object, self.bucket, key)

    async def presigned_get(self, key: str, expires: timedelta = timedelta(hours=12)) -> str:
        return await asyncio.to_thread(self._client.presigned_get_object, self.bucket, key, expires)

    async def presigned_put(self, key: str, expires: timedelta = timedelta(hours=12)) -> str:
        return await asyncio.to_thread(self._client.presigned_put_object, self.bucket, key, expires)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self._client.bucket_exists, self.bucket)
