"""Where shards live: local paths, brace patterns, `s3://` (streamed with boto3) and `pipe:`.

S3 reads retry with exponential backoff and resume at the byte they reached; after the last
retry they raise `ShardReadError`. A stream that ends before its announced length is an error,
never a silently shorter shard. A sample's ranged GET is hedged (infd/data/hedged.py) and each
request has a short timeout (`ReadOptions`). The S3 endpoint comes from boto3's usual
configuration (AWS_ENDPOINT_URL, profiles, instance roles).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from infd.data.hedged import REQUESTS_IN_FLIGHT, hedged

log = logging.getLogger(__name__)


class ShardReadError(RuntimeError):
    """A shard could not be read after retries: training must stop rather than see less data."""


class ShortRead(ShardReadError):
    """The shard is shorter than the range asked for (truncated after indexing): one sample lost."""


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace patterns, whitespace-separated lists, local directories (their *.tar) and s3:// prefixes.

    'data/shard-{000000..000009}.tar', 'data/', 's3://bucket/prefix/'; a `pipe:` command is one
    item of its own (pass a list for several).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if item.startswith("pipe:"):
            urls.append(item)
            continue
        for url in (u for part in item.split() for u in braceexpand(part)):
            if url.startswith("s3://") and url.endswith("/"):
                urls += list_s3_tars(url)
            elif not url.startswith("s3://") and Path(url).is_dir():
                urls += sorted(str(p) for p in Path(url).glob("*.tar"))
            else:
                urls.append(url)
    return urls


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


@dataclass(frozen=True)
class ReadOptions:
    """How a sample's ranged read behaves (data.loader.hedge_after_s, data.loader.request_timeout_s).
    hedge_after_s: a second GET when the first has not answered by then (0: none);
    request_timeout_s: a request that receives nothing for this long fails and is retried."""

    hedge_after_s: float = 0.3
    request_timeout_s: float = 10.0


STREAM_TIMEOUT_S = 60.0  # whole-shard streams (indexing, evaluation): no hedge, a longer patience
_S3_CLIENTS: dict = {}
_S3_LOCK = threading.Lock()
# Our own retries resume a broken stream at the byte reached; boto3's retry only whole requests.
S3_RETRIES = int(os.environ.get("INFD_S3_RETRIES", "5"))
S3_BACKOFF = float(os.environ.get("INFD_S3_BACKOFF", "0.5"))


def s3_client(read_timeout_s: float = STREAM_TIMEOUT_S):
    """One boto3 client per process, endpoint and timeout, shared by the process's threads (a client is
    thread-safe; making one is not: boto3's default session is shared, so each is made under a lock from
    a session of its own). Its connection pool holds every hedged request a process can have in flight."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), read_timeout_s)
    with _S3_LOCK:
        if key not in _S3_CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=min(10, read_timeout_s),
                            read_timeout=read_timeout_s, max_pool_connections=REQUESTS_IN_FLIGHT + 16)
            _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _S3_CLIENTS[key]


def list_s3_tars(prefix_url: str) -> list[str]:
    bucket, prefix = split_s3(prefix_url)
    urls = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        urls += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
    return sorted(urls)


def _status(err: Exception) -> int:
    """The HTTP status of a botocore ClientError, else 0."""
    response = getattr(err, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(response, dict) else 0


def _retryable(err: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, ClientError):
        code = _status(err)
        return code >= 500 or code == 429
    return isinstance(err, (BotoCoreError, OSError, ConnectionError)) or "urllib3" in type(err).__module__


class S3Stream(io.RawIOBase):
    """Sequential reader of one S3 object that resumes at its position after a failure."""

    def __init__(self, url: str, retries: int | None = None, backoff: float | None = None,
                 timeout_s: float = STREAM_TIMEOUT_S):
        self.url, self.timeout_s = url, timeout_s
        self.retries = S3_RETRIES if retries is None else retries
        self.backoff = S3_BACKOFF if backoff is None else backoff
        self.bucket, self.key = split_s3(url)
        self.pos, self.size, self.body = 0, None, None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        # A known end (a ranged read) asks for exactly those bytes, not the rest of the object.
        end = "" if self.size is None else self.size - 1
        resp = s3_client(self.timeout_s).get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end}")
        if self.size is None:
            self.size = self.pos + resp["ContentLength"]
        self.body = resp["Body"]

    def readinto(self, buf) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        for attempt in range(self.retries + 1):
            try:
                if self.body is None:
                    self._open()
                    if self.pos >= self.size:
                        return 0
                data = self.body.read(len(buf))
                if not data:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
                buf[:len(data)] = data
                self.pos += len(data)
                return len(data)
            except Exception as err:  # noqa: BLE001  classified below
                self.body = None
                if _status(err) == 416:
                    raise ShortRead(f"{self.url}: no bytes at {self.pos}: the object is shorter") from err
                if not _retryable(err) or attempt == self.retries:
                    raise ShardReadError(f"reading {self.url} failed at byte {self.pos}"
                                         f"{f' of {self.size}' if self.size else ''} after {attempt} retries: "
                                         f"{type(err).__name__}: {err}") from err
                log.warning("retrying %s at byte %d after %s: %s", self.url, self.pos, type(err).__name__, err)
                time.sleep(self.backoff * 2**attempt)
        return 0


class PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status is a ShardReadError at the end."""

    def __init__(self, url: str):
        self.cmd = url[len("pipe:"):]
        self.proc = subprocess.Popen(self.cmd, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.proc.stdout.readinto(buf)
        if n == 0 and self.proc.wait() != 0:
            raise ShardReadError(f"pipe command failed with status {self.proc.returncode}: {self.cmd}")
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        super().close()


def open_stream(url: str, buffer_size: int = 1 << 20):
    """A buffered binary reader of a shard."""
    if url.startswith("s3://"):
        return io.BufferedReader(S3Stream(url), buffer_size)
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeStream(url), buffer_size)
    return open(url, "rb", buffering=buffer_size)


# Bytes and reads of read_range in this process (a loader worker reports them with its batches).
RANGE_READS = {"bytes": 0, "reads": 0}


def read_range(url: str, offset: int, length: int, options: ReadOptions = ReadOptions(),
               retries: int | None = None) -> bytes:
    """Bytes [offset, offset + length) of a shard: the loader reads each sample this way (on S3 one
    ranged GET, hedged)."""
    if url.startswith("pipe:"):
        raise ShardReadError(f"random access (reading samples by offset) needs local or s3:// shards, not {url}")
    RANGE_READS["reads"] += 1
    if not url.startswith("s3://"):
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    else:
        data = hedged(lambda: _s3_range(url, offset, length, options, retries), options.hedge_after_s)
    RANGE_READS["bytes"] += len(data)
    if len(data) != length:
        raise ShortRead(f"{url}: wanted {length} bytes at {offset}, got {len(data)}")
    return data


def _s3_range(url: str, offset: int, length: int, options: ReadOptions, retries: int | None) -> bytes:
    stream = S3Stream(url, retries=retries, timeout_s=options.request_timeout_s)
    stream.pos, stream.size = offset, offset + length
    parts, got = [], 0
    while got < length:  # RawIOBase.read may return short reads
        chunk = stream.read(length - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_bytes(url: str) -> bytes:
    """A whole small file (an index's index.json) from a local path or s3://. A missing one raises
    FileNotFoundError either way (callers name the fix, e.g. how to build the index)."""
    if url.startswith("s3://"):
        bucket, key = split_s3(url)
        with _not_found_as_file_error(url):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(url).read_bytes()


COPY_CHUNK = 8 << 20


def copy_to_file(url: str, dest: Path) -> None:
    """Stream a file (local or s3://) into `dest` in COPY_CHUNK pieces, never whole in memory. An s3://
    copy that was cut short (the process killed) continues from the bytes `dest` already holds."""
    if not url.startswith("s3://"):
        shutil.copyfile(url, dest)
        return
    bucket, key = split_s3(url)
    with _not_found_as_file_error(url):
        size = s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:  # not a prefix of this object: start again
        dest.unlink()
        have = 0
    stream = S3Stream(url)
    stream.pos, stream.size = have, size
    with open(dest, "ab") as f:
        while chunk := stream.read(COPY_CHUNK):
            f.write(chunk)


@contextlib.contextmanager
def _not_found_as_file_error(url: str):
    try:
        yield
    except Exception as err:  # noqa: BLE001  botocore's ClientError, imported lazily
        if _status(err) == 404:
            raise FileNotFoundError(f"{url}: no such object") from err
        raise


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if base.startswith("s3://") else str(Path(base) / name)


def dirname_url(url: str) -> str:
    return url.rsplit("/", 1)[0] if url.startswith("s3://") else str(Path(url).parent)
