"""Object stores: the few operations the feature store needs, on a local folder or S3.

Keys are ``/``-separated and relative to the store's root (a folder, or ``s3://bucket/prefix``).

- ``put(key, data)`` makes the object visible whole or not at all (a local write goes to a
  temporary name and is renamed; an S3 PUT is atomic).
- ``put(key, data, exclusive=True)`` fails with :class:`AlreadyExists` when the key exists:
  a hard link on disk, ``If-None-Match: *`` on S3. Manifest versions use it, so two
  writers can never both commit version N.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dtm_ops.errors import FeatureStoreError
from dtm_ops.fileio import FileExists, atomic_write, is_temporary
from dtm_ops.settings import env_number, number


#: Keys one S3 ``DeleteObjects`` request takes at most (the API's limit).
DELETE_BATCH = 1000

#: What :meth:`ObjectStore.delete_many` tells after each request: its keys, and those of them
#: it could not delete with the reasons.
DeleteCallback = Callable[[list[str], dict[str, str]], None]


class ObjectNotFound(FeatureStoreError):
    """The key does not exist."""


class AlreadyExists(FeatureStoreError):
    """An exclusive put found the key taken."""


class ShortRead(FeatureStoreError):
    """An object ended before the bytes asked for (over S3: the body was cut off)."""


class BadKey(FeatureStoreError):
    """A key that could name something outside the store's root."""


def check_key(key: str) -> str:
    """``key`` if it stays inside the store's root: relative, ``/``-separated, with no empty,
    ``.`` or ``..`` segment and no backslash or NUL (keys may come from a web request).
    ``""`` and a trailing ``/`` are allowed: they are prefixes for :meth:`list`."""
    parts = key.removesuffix("/").split("/") if key else []
    if "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise BadKey(f"bad object key {key!r}: keys are relative, with no '.', '..' or empty segments")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, byte size and last modification (seconds since the epoch)."""

    key: str
    bytes: int
    modified: float


class ObjectStore(Protocol):
    uri: str
    #: Whether parallel ranged reads of one large object beat a single read (a high-latency
    #: server, where one stream is slow); a local file is read in one go.
    ranged_reads: bool

    def get(self, key: str) -> bytes:
        """Bytes of ``key``."""

    def read_into(self, key: str, out: memoryview, offset: int = 0) -> None:
        """Fill ``out`` with ``key``'s bytes from ``offset`` on, read straight into it (no
        intermediate copy where the backend allows: a scan moves gigabytes). Raises
        :class:`ObjectNotFound`, or :class:`FeatureStoreError` if the object ends early."""

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None: ...

    def size(self, key: str) -> int | None:
        """Byte size, or ``None`` when the key does not exist."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix``."""

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The same objects as :meth:`list`, with their sizes and modification times."""

    def list_partial(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """What writers began under ``prefix`` and never finished nor removed (a local
        write's temporary file, left by a killed process); :meth:`delete` takes their keys."""

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing happens when it does not exist."""

    def delete_many(self, keys: Sequence[str], on_done: DeleteCallback | None = None) -> dict[str, str]:
        """Remove ``keys`` (absent ones are no error) in as few requests as the backend
        allows; returns ``{key: reason}`` for those that could not be removed. The others
        are gone even where some fail. ``on_done(keys, refused)`` is called after each
        request with its keys and its refusals, so a caller killed midway has heard of
        every request that finished."""


def _fill(readinto, out: memoryview, what: str, offset: int) -> None:
    """Call ``readinto`` until ``out`` is full; an early end of the object raises."""
    done = 0
    while done < len(out):
        n = readinto(out[done:])
        if not n:
            raise ShortRead(f"{what}: object ends at byte {offset + done}, {len(out) - done} bytes short")
        done += n


def _read_body_into(response: dict, out: memoryview, what: str, offset: int) -> None:
    """A ranged GET's body straight into ``out``. The HTTP response under urllib3 reads from
    the socket into a caller's buffer; urllib3's own ``readinto`` goes through an
    intermediate bytes object (one more copy of every byte: about 0.3 s per 550 MB on a
    2-core machine). That is the fallback where the layers differ."""
    if response.get("ContentLength") != len(out):  # e.g. a server that ignored the Range
        raise FeatureStoreError(
            f"{what}: GET of {len(out)} bytes from byte {offset} answered {response.get('ContentLength')} bytes"
        )
    body = response["Body"]
    raw = getattr(body, "_raw_stream", None)
    http = getattr(raw, "_fp", None)
    if http is None or not hasattr(http, "readinto") or response.get("ContentEncoding"):
        out[:] = body.read()
        return
    _fill(http.readinto, out, what, offset)
    raw.release_conn()  # fully read: the connection goes back to the pool


_DEFAULT_S3: "S3Config | None" = None


def set_default_s3_config(config: "S3Config | None") -> None:
    """The S3 settings used where none are passed (an Airflow task sets them from its
    connection); ``None`` goes back to the environment."""
    global _DEFAULT_S3
    _DEFAULT_S3 = config


def default_s3_config() -> "S3Config":
    return _DEFAULT_S3 or S3Config.from_env()


def open_objects(uri: str | os.PathLike, *, s3_config: "S3Config | None" = None) -> ObjectStore:
    """``s3://bucket/prefix`` -> :class:`S3ObjectStore`; anything else is a local folder."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise FeatureStoreError(f"{text}: an S3 URI needs a bucket: s3://bucket/prefix")
        return S3ObjectStore(bucket, prefix.strip("/"), s3_config or default_s3_config())
    return LocalObjectStore(text)


# --------------------------------------------------------------------------- local
class LocalObjectStore:
    ranged_reads = False

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri}: {key} not found") from None

    def read_into(self, key: str, out: memoryview, offset: int = 0) -> None:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                f.seek(offset)
                _fill(f.readinto, out, f"{self.uri}: {key}", offset)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri}: {key} not found") from None

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        try:
            atomic_write(self._path(key), data, exclusive=exclusive)
        except FileExists:
            raise AlreadyExists(f"{self.uri}: {key} already exists") from None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.list_info(prefix))

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._files(prefix, partial=False)

    def list_partial(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._files(prefix, partial=True)  # atomic_write's temporary names

    def _files(self, prefix: str, *, partial: bool) -> Iterator[ObjectInfo]:
        base = self.root / check_key(prefix)
        folder = base if base.is_dir() or not prefix else base.parent  # no root: nothing, not its parent's files
        if not folder.is_dir():
            return
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if rel.startswith(prefix) and (is_temporary(p.name) if partial else not p.name.endswith(".tmp")):
                try:
                    st = p.stat()
                except FileNotFoundError:  # deleted since the folder was listed
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield ObjectInfo(rel, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_many(self, keys: Sequence[str], on_done: DeleteCallback | None = None) -> dict[str, str]:
        failed = {}
        for key in keys:  # one file at a time: each is a request of its own
            refused = {}
            try:
                self.delete(key)
            except OSError as e:
                refused[key] = f"{type(e).__name__}: {e.strerror or e}"
            failed.update(refused)
            if on_done is not None:
                on_done([key], refused)
        return failed


# --------------------------------------------------------------------------- S3
@dataclass(frozen=True)
class S3Config:
    """How to reach S3 (AWS, Ceph RGW, MinIO). Secrets never appear in ``repr``.

    ``from_env`` reads ``DTM_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``), ``AWS_DEFAULT_REGION``
    and the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
    (left to boto3's own credential chain when unset).
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    path_style: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "S3Config":
        e = os.environ if env is None else env
        return cls(
            endpoint_url=e.get("DTM_S3_ENDPOINT") or e.get("AWS_ENDPOINT_URL") or None,
            region=e.get("AWS_DEFAULT_REGION") or e.get("AWS_REGION") or None,
            access_key=e.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=e.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=e.get("AWS_SESSION_TOKEN") or None,
            max_attempts=env_number("DTM_S3_MAX_ATTEMPTS", 5, e, minimum=1),
        )

    @classmethod
    def from_aws_connection(
        cls, login: str | None, password: str | None, extra: dict | None, source: str = "connection"
    ) -> "S3Config":
        """From the fields of an Airflow ``aws`` connection (as the Amazon provider reads them):
        login = access key id, password = secret key, extra = ``endpoint_url`` (or
        ``service_config.s3.endpoint_url``), ``region_name``, ``aws_session_token``, and
        ``config_kwargs.retries`` as botocore reads it: ``total_max_attempts``, or
        ``max_attempts`` retries after the first try (else ``DTM_S3_MAX_ATTEMPTS``, else 5
        attempts in all). ``source`` names the connection in errors."""
        extra = extra or {}
        endpoint = extra.get("endpoint_url") or extra.get("service_config", {}).get("s3", {}).get("endpoint_url")
        retries = (extra.get("config_kwargs") or {}).get("retries") or {}
        field = "extra.config_kwargs.retries."
        if "total_max_attempts" in retries:
            attempts = number(retries["total_max_attempts"], source=source, field=f"{field}total_max_attempts",
                              minimum=1)
        elif "max_attempts" in retries:
            attempts = number(retries["max_attempts"], source=source, field=f"{field}max_attempts") + 1
        else:
            attempts = None
        return cls(
            endpoint_url=endpoint,
            region=extra.get("region_name"),
            access_key=login or extra.get("aws_access_key_id"),
            secret_key=password or extra.get("aws_secret_access_key"),
            session_token=extra.get("aws_session_token"),
            max_attempts=cls.from_env().max_attempts if attempts is None else attempts,
        )

    def client(self):
        """A boto3 S3 client: retries with backoff on throttling, 5xx and dropped connections."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=Config(
                retries={"total_max_attempts": self.max_attempts, "mode": "standard"},  # max_attempts: retries
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path" if self.path_style else "auto"},
                max_pool_connections=32,
            ),
        )


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix``. One boto3 client, created on first use and shared
    by the reader's threads (low-level boto3 clients are thread-safe; creating one costs
    tens of milliseconds)."""

    ranged_reads = True

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.config = config
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self.config.client()
        return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, key: str, exc: Exception, what: str) -> FeatureStoreError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{self.uri}: {key} not found")
            if code == "NoSuchBucket":
                return FeatureStoreError(f"{self.uri}: bucket {self.bucket!r} does not exist")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return FeatureStoreError(f"{self.uri}: {what} {key}: access denied ({code}); check the S3 credentials")
            return FeatureStoreError(f"{self.uri}: {what} {key} failed: {code or exc}")
        return FeatureStoreError(
            f"{self.uri}: {what} {key} failed after {self.config.max_attempts} attempts: {type(exc).__name__}: {exc}"
        )

    def get(self, key: str) -> bytes:
        return self._get(key, None, lambda response: response["Body"].read())

    def read_into(self, key: str, out: memoryview, offset: int = 0) -> None:
        if len(out):
            where = f"{self.uri}: {key}"
            self._get(key, f"bytes={offset}-{offset + len(out) - 1}", lambda r: _read_body_into(r, out, where, offset))

    def _get(self, key: str, byte_range: str | None, read):
        """GET ``key`` (an HTTP ``Range`` if given) and ``read(response)``; a body cut off
        mid-stream is fetched again (botocore retries only the request)."""
        kwargs = {"Bucket": self.bucket, "Key": self._key(key)}
        if byte_range is not None:
            kwargs["Range"] = byte_range
        for attempt in range(self.config.max_attempts):
            try:
                response = self.client.get_object(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified by _fail
                raise self._fail(key, exc, "GET") from None
            try:
                return read(response)
            except Exception as exc:  # noqa: BLE001 - the body was cut off mid-stream: try again
                response["Body"].close()
                if isinstance(exc, FeatureStoreError) and not isinstance(exc, ShortRead):
                    raise  # a wrong answer (a Range ignored): asking again will not help
                if attempt + 1 == self.config.max_attempts:
                    raise self._fail(key, exc, "GET") from None
                time.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if exclusive:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kwargs)
        except Exception as exc:  # noqa: BLE001
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise AlreadyExists(f"{self.uri}: {key} already exists") from None
            raise self._fail(key, exc, "PUT") from None

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as exc:  # noqa: BLE001
            err = self._fail(key, exc, "HEAD")
            if isinstance(err, ObjectNotFound):
                return None
            raise err from None

    def list(self, prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.list_info(prefix))

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp())
        except Exception as exc:  # noqa: BLE001
            raise self._fail(prefix, exc, "LIST") from None

    def list_partial(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(())  # a PUT is atomic (multipart uploads are not used): nothing is left half written

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, exc, "DELETE") from None

    def delete_many(self, keys: Sequence[str], on_done: DeleteCallback | None = None) -> dict[str, str]:
        """One ``DeleteObjects`` request per :data:`DELETE_BATCH` keys, quiet (the answer
        lists only the keys that failed). A request that fails whole fails its keys."""
        failed = {}
        for start in range(0, len(keys), DELETE_BATCH):
            batch = {self._key(k): k for k in keys[start:start + DELETE_BATCH]}  # the server's key: ours
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                refused = {batch.get(e["Key"], e["Key"]): f"{e.get('Code', '')}: {e.get('Message', '')}".strip(": ")
                           for e in answer.get("Errors", [])}
            except Exception as exc:  # noqa: BLE001
                reason = str(self._fail(f"{len(batch)} keys from {keys[start]}", exc, "DELETE"))
                refused = dict.fromkeys(batch.values(), reason)
            failed.update(refused)
            if on_done is not None:
                on_done(list(batch.values()), refused)
        return failed
