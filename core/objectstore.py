"""Content-addressed image storage behind one small interface.

Images are stored under ``<prefix>/<sha256 hex>`` and only keys travel in queue messages. Two
implementations share the interface: :class:`S3Store` talks to any S3 server through the ``minio``
SDK (MinIO in production, Ceph radosgw in tests); :class:`DiskStore` is the embedded default, a
directory on the local disk. Errors of the SDK or the file system are translated here into
``STORE_UNAVAILABLE`` (retryable) or ``IMAGE_MISSING`` (not).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Protocol

from .config import Settings
from .errors import Code, InputError, ServiceError
from .files import atomic_write

_KEY = re.compile(r"^[a-z][a-z0-9_-]*(/[A-Za-z0-9._-]+)+$")


def content_key(prefix: str, data: bytes) -> str:
    return f"{prefix}/{hashlib.sha256(data).hexdigest()}"


def _check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key:
        raise InputError(Code.IMAGE_MISSING, f"malformed object key {key!r}")
    return key


class ObjectStore(Protocol):
    kind: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str, *, max_bytes: int | None = None) -> bytes: ...
    def size(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...


def put_content(store: ObjectStore, prefix: str, data: bytes) -> str:
    """Store ``data`` under its SHA-256 (idempotent: the same bytes always give the same key)."""
    key = content_key(prefix, data)
    if store.size(key) is None:
        store.put(key, data)
    return key


class DiskStore:
    """The embedded store: one file per object under ``root``; writes are atomic renames."""

    kind = "disk"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise ServiceError(Code.STORE_UNAVAILABLE, f"disk store write failed: {exc}") from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise InputError(Code.IMAGE_TOO_LARGE, f"{size} bytes is over the limit of {max_bytes}")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise InputError(Code.IMAGE_MISSING, f"no object {key}") from exc
        except OSError as exc:
            raise ServiceError(Code.STORE_UNAVAILABLE, f"disk store read failed: {exc}") from exc

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )


class S3Store:
    """Any S3 server through the ``minio`` SDK; creates its bucket when missing."""

    kind = "s3"

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
        from minio import Minio
        from minio.error import S3Error

        self._S3Error = S3Error
        self.bucket = bucket
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise ServiceError(Code.STORE_UNAVAILABLE, f"S3 bucket {bucket}: {exc.code}") from exc
        except ValueError:  # a malformed bucket name or endpoint: configuration, not availability
            raise
        except Exception as exc:  # urllib3 connection errors and the like
            raise ServiceError(Code.STORE_UNAVAILABLE, f"S3 endpoint {endpoint} unreachable: {exc}") from exc

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                raise InputError(Code.IMAGE_MISSING, f"no object {args[1] if len(args) > 1 else ''}") from exc
            raise ServiceError(Code.STORE_UNAVAILABLE, f"S3 error {exc.code}") from exc
        except (InputError, ServiceError):
            raise
        except Exception as exc:
            raise ServiceError(Code.STORE_UNAVAILABLE, f"S3 request failed: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        self._call(self.client.put_object, self.bucket, key, io.BytesIO(data), len(data))

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        _check_key(key)
        if max_bytes is not None:
            size = self.size(key)
            if size is None:
                raise InputError(Code.IMAGE_MISSING, f"no object {key}")
            if size > max_bytes:
                raise InputError(Code.IMAGE_TOO_LARGE, f"{size} bytes is over the limit of {max_bytes}")
        resp = self._call(self.client.get_object, self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def size(self, key: str) -> int | None:
        _check_key(key)
        try:
            return self._call(self.client.stat_object, self.bucket, key).size
        except InputError:
            return None

    def delete(self, key: str) -> None:
        _check_key(key)
        self._call(self.client.remove_object, self.bucket, key)

    def list(self, prefix: str) -> list[str]:
        objs = self._call(self.client.list_objects, self.bucket, prefix=prefix.rstrip("/") + "/", recursive=True)
        return sorted(o.object_name for o in self._call(list, objs))


def open_store(s: Settings) -> ObjectStore:
    if s.store_kind == "s3":
        return S3Store(
            s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket, secure=s.s3_secure, region=s.s3_region
        )
    return DiskStore(Path(s.home) / "objects")
