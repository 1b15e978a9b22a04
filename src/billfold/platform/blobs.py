"""Blob storage behind one protocol: a local directory by default, S3 when configured."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Protocol

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,511}$")


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def get(self, key: str) -> tuple[bytes, str] | None: ...
    async def delete(self, key: str) -> None: ...


def _check_key(key: str) -> None:
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
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
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            path.with_name(path.name + ".type").write_text(content_type)
            os.replace(tmp, path)

        await asyncio.to_thread(write)

    async def get(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)

        def read() -> tuple[bytes, str] | None:
            if not path.is_file():
                return None
            kind = path.with_name(path.name + ".type")
            ctype = kind.read_text() if kind.exists() else "application/octet-stream"
            return path.read_bytes(), ctype

        return await asyncio.to_thread(read)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            for p in (path, path.with_name(path.name + ".type")):
                p.unlink(missing_ok=True)

        await asyncio.to_thread(remove)
