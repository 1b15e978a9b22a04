"""BlobStore contract, run against both stores: a directory and S3 (a real moto server).

The moto server runs as a subprocess on a free loopback port. If it cannot start the tests
fail; they never skip.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from billfold.app import create_app
from billfold.config import Settings
from billfold.platform.blobs import (
    BlobStore,
    FilesystemBlobStore,
    S3BlobStore,
    build_blob_store,
)
from tests.conftest import make_settings, sign_up

REGION = "us-east-1"
BUCKET = "billfold-test-blobs"

# Dummy credentials, and no shared config or instance metadata: nothing leaves this machine.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield


@pytest.fixture(scope="module")
def moto_url(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API (moto server) in its own process, stopped after the module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_AWS_ENV},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on {url} within 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3(moto_url: str) -> Any:
    """A plain boto3 client on the moto server, to look at the bucket from outside billfold."""
    client = boto3.client("s3", endpoint_url=moto_url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return client


def _objects(s3: Any, prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    blobs: BlobStore
    if request.param == "filesystem":
        blobs = FilesystemBlobStore(tmp_path / "blobs")
    else:
        url = request.getfixturevalue("moto_url")
        request.getfixturevalue("s3")
        # A fresh prefix per test keeps the tests independent in the shared bucket.
        blobs = S3BlobStore(BUCKET, f"contract-{uuid.uuid4().hex}", url, REGION)
    try:
        yield blobs
    finally:
        await blobs.aclose()


# --- the contract every BlobStore keeps ---------------------------------------------------


async def test_put_then_get_returns_bytes_and_content_type(store: BlobStore) -> None:
    await store.put("receipts/usr_1/r1.pdf", b"%PDF-1.7 hello", "application/pdf")
    assert await store.get("receipts/usr_1/r1.pdf") == (b"%PDF-1.7 hello", "application/pdf")


async def test_missing_key_is_none(store: BlobStore) -> None:
    assert await store.get("nothing/here") is None
    await store.put("dir/present", b"x", "text/plain")
    assert await store.get("dir/absent") is None
    assert await store.get("dir") is None  # a "directory" of blobs is not a blob


async def test_overwrite_replaces_data_and_content_type(store: BlobStore) -> None:
    await store.put("avatars/u/a", b"first", "image/png")
    await store.put("avatars/u/a", b"second, longer", "image/jpeg")
    assert await store.get("avatars/u/a") == (b"second, longer", "image/jpeg")


async def test_delete_removes_and_is_idempotent(store: BlobStore) -> None:
    await store.put("a/b/c", b"data", "text/plain")
    await store.put("a/b/d", b"other", "text/plain")
    await store.delete("a/b/c")
    assert await store.get("a/b/c") is None
    await store.delete("a/b/c")
    await store.delete("never/existed")
    assert await store.get("a/b/d") == (b"other", "text/plain")


async def test_binary_data_round_trips_exactly(store: BlobStore) -> None:
    data = bytes(range(256)) * 64 + b"\x00\r\n\x00" + os.urandom(200_000)
    await store.put("bin/blob", data, "application/octet-stream")
    assert await store.get("bin/blob") == (data, "application/octet-stream")
    await store.put("bin/empty", b"", "application/octet-stream")
    assert await store.get("bin/empty") == (b"", "application/octet-stream")


@pytest.mark.parametrize(
    "content_type",
    ["image/png", "image/webp", "application/pdf", "text/plain; charset=utf-8"],
)
async def test_content_types_are_kept(store: BlobStore, content_type: str) -> None:
    await store.put("typed/x", b"payload", content_type)
    assert await store.get("typed/x") == (b"payload", content_type)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../x",
        "..",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "/etc/passwd",
        "/abs",
        ".hidden",
        "a\\b",
        "a b",
        "a\x00b",
        "k\n",
        "x" * 600,
        "avatars/u/a.type",
        "avatars/u/a.tmp",
    ],
)
async def test_unsafe_keys_are_refused_by_every_operation(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="unsafe blob key"):
        await store.put(key, b"x", "text/plain")
    with pytest.raises(ValueError, match="unsafe blob key"):
        await store.get(key)
    with pytest.raises(ValueError, match="unsafe blob key"):
        await store.delete(key)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_filesystem_store_writes_nothing_outside_its_root(tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "root")
    for key in ("../escape", "/tmp/escape", "a/../../escape"):
        with pytest.raises(ValueError):
            await blobs.put(key, b"x", "text/plain")
    assert _names(tmp_path) == []
    await blobs.put("k", b"v", "text/plain")
    assert _names(tmp_path / "root") == ["k", "k.type"]


# --- S3 specifics ---------------------------------------------------------------------------


async def test_s3_objects_live_under_the_prefix_with_encryption(s3: Any, moto_url: str) -> None:
    prefix = f"pfx-{uuid.uuid4().hex}"
    blobs = S3BlobStore(BUCKET, f"/{prefix}/", moto_url, REGION)
    try:
        await blobs.put("receipts/r.pdf", b"%PDF", "application/pdf")
        assert _objects(s3, prefix) == [f"{prefix}/receipts/r.pdf"]
        head = s3.head_object(Bucket=BUCKET, Key=f"{prefix}/receipts/r.pdf")
        assert head["ServerSideEncryption"] == "AES256"
        assert head["ContentType"] == "application/pdf"
        other = S3BlobStore(BUCKET, f"{prefix}-other", moto_url, REGION)
        try:
            assert await other.get("receipts/r.pdf") is None
        finally:
            await other.aclose()
        await blobs.delete("receipts/r.pdf")
        assert _objects(s3, prefix) == []
    finally:
        await blobs.aclose()


async def test_s3_uses_kms_when_a_key_id_is_configured(s3: Any, moto_url: str) -> None:
    kms = boto3.client("kms", endpoint_url=moto_url, region_name=REGION)
    key_id = kms.create_key(Description="billfold blobs")["KeyMetadata"]["Arn"]
    prefix = f"kms-{uuid.uuid4().hex}"
    blobs = S3BlobStore(BUCKET, prefix, moto_url, REGION, kms_key_id=key_id)
    try:
        await blobs.put("doc", b"secret", "application/pdf")
        head = s3.head_object(Bucket=BUCKET, Key=f"{prefix}/doc")
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == key_id
        assert await blobs.get("doc") == (b"secret", "application/pdf")
    finally:
        await blobs.aclose()


async def test_s3_missing_bucket_is_an_error_not_a_missing_blob(moto_url: str) -> None:
    from botocore.exceptions import ClientError

    blobs = S3BlobStore(f"no-such-bucket-{uuid.uuid4().hex[:8]}", "", moto_url, REGION)
    try:
        with pytest.raises(ClientError):
            await blobs.get("a")
        with pytest.raises(ClientError):
            await blobs.put("a", b"x", "text/plain")
    finally:
        await blobs.aclose()


async def test_s3_store_reopens_after_close(s3: Any, moto_url: str) -> None:
    blobs = S3BlobStore(BUCKET, f"reopen-{uuid.uuid4().hex}", moto_url, REGION)
    await blobs.put("k", b"1", "text/plain")
    await blobs.aclose()
    await blobs.aclose()
    assert await blobs.get("k") == (b"1", "text/plain")
    await blobs.aclose()


# --- configuration ------------------------------------------------------------------------


def test_build_blob_store_follows_settings(tmp_path: Path) -> None:
    fs = build_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(fs, FilesystemBlobStore)
    s3store = build_blob_store(
        Settings(
            data_dir=tmp_path,
            blob_store="s3",
            s3_bucket="b",
            s3_prefix="p",
            s3_endpoint_url="http://127.0.0.1:9",
            s3_region="eu-central-1",
        )
    )
    assert isinstance(s3store, S3BlobStore)
    assert s3store.bucket == "b" and s3store.object_key("x/y") == "p/x/y"
    with pytest.raises(ValueError, match="S3_BUCKET"):
        build_blob_store(Settings(data_dir=tmp_path, blob_store="s3"))
    with pytest.raises(ValueError):
        Settings(blob_store="gcs")  # type: ignore[arg-type]


def test_s3_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLFOLD_BLOB_STORE", "s3")
    monkeypatch.setenv("BILLFOLD_S3_BUCKET", "receipts")
    monkeypatch.setenv("BILLFOLD_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("BILLFOLD_S3_KMS_KEY_ID", "alias/billfold")
    s = Settings()
    assert (s.blob_store, s.s3_bucket, s.s3_endpoint_url, s.s3_kms_key_id) == (
        "s3",
        "receipts",
        "http://minio:9000",
        "alias/billfold",
    )


# --- end to end: the app stores avatars in the bucket ---------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


async def test_app_with_s3_blob_store_keeps_avatars_in_the_bucket(
    settings: Settings, s3: Any, moto_url: str, tmp_path: Path
) -> None:
    prefix = f"app-{uuid.uuid4().hex}"
    app_settings = make_settings(
        settings.database_url,
        settings.redis_url,
        tmp_path,
        secret_key=settings.secret_key,
        blob_store="s3",
        s3_bucket=BUCKET,
        s3_prefix=prefix,
        s3_endpoint_url=moto_url,
        s3_region=REGION,
    )
    app = create_app(app_settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            me = await sign_up(client, name="Sam Three")
            uid = me.user["id"]
            first, second = _png((10, 20, 30)), _png((200, 100, 0))

            r = await client.put(
                "/v1/me/avatar", files={"file": ("a.png", first, "image/png")}, headers=me.headers
            )
            assert r.status_code == 200, r.text
            got = await client.get("/v1/me/avatar", headers=me.headers)
            assert got.status_code == 200 and got.content == first
            assert got.headers["content-type"] == "image/png"
            keys = _objects(s3, f"{prefix}/avatars/{uid}/")
            assert len(keys) == 1
            obj = s3.get_object(Bucket=BUCKET, Key=keys[0])
            assert obj["Body"].read() == first and obj["ContentType"] == "image/png"
            assert obj["ServerSideEncryption"] == "AES256"

            # A new avatar replaces the object; the old one is deleted after commit.
            r = await client.put(
                "/v1/me/avatar", files={"file": ("b.png", second, "image/png")}, headers=me.headers
            )
            assert r.status_code == 200, r.text
            got = await client.get("/v1/me/avatar", headers=me.headers)
            assert got.status_code == 200 and got.content == second
            new_keys = _objects(s3, f"{prefix}/avatars/{uid}/")
            assert len(new_keys) == 1 and new_keys != keys
    # Nothing went to the local directory.
    assert not (tmp_path / "blobs").exists()
