"""Blob storage behind one protocol: a local directory by default, S3 when configured."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from billfold.config import Settings

if TYPE_CHECKING:
    from aiobotocore.client import AioBaseClient

_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,511}")
# The filesystem store keeps `<key>.type` and `<key>.<n>.tmp` beside each blob; keys with these
# endings are refused by every store so both behave the same.
_RESERVED_SUFFIXES = (".type", ".tmp")
_DEFAULT_TYPE = "application/octet-stream"


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def get(self, key: str) -> tuple[bytes, str] | None: ...
    async def delete(self, key: str) -> None: ...
    async def aclose(self) -> None: ...


def _check_key(key: str) -> None:
    """Keys are relative paths of safe characters: no `..`, `.` or empty segment, no leading `/`."""
    parts = key.split("/")
    if (
        not _SAFE_KEY.fullmatch(key)  # `$` would let a trailing newline through
        or any(p in ("", ".", "..") for p in parts)
        or key.endswith(_RESERVED_SUFFIXES)
    ):
        raise ValueError(f"unsafe blob key {key!r}")


class FilesystemBlobStore:
    """Stores each blob as a file plus a `.type` sidecar holding its content type."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self._root / key

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(data)
                path.with_name(path.name + ".type").write_text(content_type)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

        await asyncio.to_thread(write)

    async def get(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)

        def read() -> tuple[bytes, str] | None:
            if not path.is_file():
                return None
            kind = path.with_name(path.name + ".type")
            ctype = kind.read_text() if kind.exists() else _DEFAULT_TYPE
            return path.read_bytes(), ctype

        return await asyncio.to_thread(read)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            for p in (path, path.with_name(path.name + ".type")):
                p.unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def aclose(self) -> None:
        return None


class S3BlobStore:
    """Blobs as objects in one S3 bucket (or MinIO/moto via `endpoint_url`), under `prefix`.

    Every object is written with server-side encryption: SSE-S3 (`AES256`), or SSE-KMS when
    `kms_key_id` is given. Credentials come from the standard AWS chain (environment, shared
    config, web identity, instance profile), never from billfold's settings. The client (one
    aiohttp connection pool) opens on first use and is closed by `aclose()`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        kms_key_id: str | None = None,
        *,
        path_style: bool | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("S3BlobStore needs a bucket")
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self._endpoint_url = endpoint_url or None
        self._region = region or None
        self._kms_key_id = kms_key_id or None
        # S3-compatible servers behind a custom endpoint rarely resolve bucket subdomains.
        self._path_style = self._endpoint_url is not None if path_style is None else path_style
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._stack: AsyncExitStack | None = None
        self._client: AioBaseClient | None = None
        self._opening = asyncio.Lock()

    @property
    def bucket(self) -> str:
        return self._bucket

    def object_key(self, key: str) -> str:
        """The S3 object key that holds blob `key`."""
        _check_key(key)
        return self._prefix + key

    async def _s3(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._opening:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                config = AioConfig(
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    retries={"max_attempts": self._max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path" if self._path_style else "auto"},
                )
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        region_name=self._region,
                        endpoint_url=self._endpoint_url,
                        config=config,
                    )
                )
                self._stack = stack
        return self._client

    def _encryption(self) -> dict[str, str]:
        if self._kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self._kms_key_id}
        return {"ServerSideEncryption": "AES256"}

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        name = self.object_key(key)
        s3 = await self._s3()
        await s3.put_object(
            Bucket=self._bucket,
            Key=name,
            Body=data,
            ContentType=content_type,
            **self._encryption(),
        )

    async def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        name = self.object_key(key)
        s3 = await self._s3()
        try:
            resp = await s3.get_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # A missing bucket is a configuration error and must surface, not read as "no blob".
            if error.get("Code") in ("NoSuchKey", "404", "NotFound") or (
                status == 404 and error.get("Code") != "NoSuchBucket"
            ):
                return None
            raise
        async with resp["Body"] as body:
            data = await body.read()
        return data, resp.get("ContentType") or _DEFAULT_TYPE

    async def delete(self, key: str) -> None:
        # DeleteObject answers 204 whether or not the object existed: idempotent by nature.
        name = self.object_key(key)
        s3 = await self._s3()
        await s3.delete_object(Bucket=self._bucket, Key=name)

    async def aclose(self) -> None:
        async with self._opening:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def build_blob_store(settings: Settings) -> BlobStore:
    """The configured store: `data_dir/blobs` by default, S3 when `blob_store == "s3"`."""
    if settings.blob_store == "s3":
        if not settings.s3_bucket:
            raise ValueError("BILLFOLD_S3_BUCKET must be set when BILLFOLD_BLOB_STORE=s3")
        return S3BlobStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            kms_key_id=settings.s3_kms_key_id,
        )
    return FilesystemBlobStore(Path(settings.data_dir) / "blobs")
