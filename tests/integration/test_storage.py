"""The object store against the S3 endpoint: put/get/list/stat, checksums, presigned URLs."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request

import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore

pytestmark = pytest.mark.integration


def _http(request: urllib.request.Request) -> tuple[int, bytes]:
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture
async def store(connection: ConnectionSettings) -> ObjectStore:
    store = ObjectStore.from_settings(connection)
    await store.ensure_bucket()
    await store.ensure_bucket()  # idempotent: every replica calls it at start
    return store


async def test_put_get_list_stat_delete(store: ObjectStore) -> None:
    body = b"\x00segment bytes\xff" * 1000
    info = await store.put_bytes("segments/000001-000100.jsonl.zst", body, "application/zstd")
    await store.put_bytes("segments/000101-000200.jsonl.zst", b"second")
    await store.put_bytes("datasets/d1/manifest.json", b"{}", "application/json")

    assert info.sha256 == hashlib.sha256(body).hexdigest()
    assert await store.get_bytes("segments/000001-000100.jsonl.zst") == body
    assert await store.list_keys("segments/") == [
        "segments/000001-000100.jsonl.zst",
        "segments/000101-000200.jsonl.zst",
    ]
    stat = await store.stat("segments/000001-000100.jsonl.zst")
    assert stat is not None and stat.size == len(body) and stat.sha256 == info.sha256
    assert await store.stat("segments/missing") is None

    await store.delete("datasets/d1/manifest.json")
    assert await store.list_keys("datasets/") == []


async def test_a_retried_put_to_the_same_key_replaces_not_duplicates(store: ObjectStore) -> None:
    await store.put_bytes("k", b"first try")
    await store.put_bytes("k", b"first try")
    assert await store.list_keys() == ["k"]


async def test_presigned_urls_let_a_trainer_download_and_upload_without_keys(store: ObjectStore) -> None:
    await store.put_bytes("datasets/d1/art.jsonl", b'{"trajectories": []}\n')
    url = await store.presigned_get("datasets/d1/art.jsonl")
    assert await asyncio.to_thread(_http, urllib.request.Request(url)) == (200, b'{"trajectories": []}\n')

    upload = await store.presigned_put("models/policy/v2/model.bin")
    # An explicit content type: urllib would otherwise send a form type, which moto parses away.
    request = urllib.request.Request(
        upload, data=b"weights", method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    assert (await asyncio.to_thread(_http, request))[0] == 200
    assert await store.get_bytes("models/policy/v2/model.bin") == b"weights"
