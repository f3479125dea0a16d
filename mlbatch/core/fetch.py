"""One image object's bytes, for whatever a manifest row points at: a bad row is an error, never a hang.

A manifest comes from someone else, so a row may name anything: a named pipe (``open`` blocks
until a writer comes), ``/dev/zero`` (reads without end), ``/dev/stdin`` (in a decode helper: its
own request pipe), a folder, a 40 GB object, an S3 body that trickles a byte a minute. Each
becomes ``FetchError`` with a reason for the row's ``error`` column, within ``timeout`` seconds:

* a local path is opened without blocking and must be a regular file (links are followed);
* no object is read past ``max_bytes`` (``--max-bytes``), locally or on S3, whatever its size says;
* an S3 read ends at ``timeout`` seconds in all, however slowly its body arrives; botocore retries
  the request (standard mode), a body dropped midway is read again here.
"""

from __future__ import annotations

import os
import random
import stat
import time

from .storage import FetchPolicy, is_s3, local_path, s3_client

DEFAULT_MAX_BYTES = 64 * 1024 * 1024   # a 64-megapixel JPEG is ~30 MB; a scan that needs more: --max-bytes
DEFAULT_TIMEOUT = 120.0                # seconds for one object, all attempts together
_CHUNK = 256 * 1024   # the deadline is checked between chunks
_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


class FetchError(Exception):
    """An object could not be read; the message is what goes in the output's ``error`` column."""


def _too_large(size: int | str, max_bytes: int) -> FetchError:
    return FetchError(f"object too large: {size} bytes, over the limit of {max_bytes} (--max-bytes)")


def fetch(uri: str | None, policy: FetchPolicy = FetchPolicy(), max_bytes: int = DEFAULT_MAX_BYTES,
          timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The bytes of one image object, or ``FetchError`` saying why not."""
    if uri is None or not uri.strip():
        raise FetchError("null or empty image URI")
    if is_s3(uri):
        return _fetch_s3(uri, policy, max_bytes, time.monotonic() + timeout)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise FetchError(f"unsupported URI scheme {scheme!r}: use a local path, file:// or s3://")
    return _fetch_local(local_path(uri), max_bytes)


def _fetch_local(path: str, max_bytes: int) -> bytes:
    try:   # O_NONBLOCK: opening a named pipe must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FetchError("object not found") from None
    except IsADirectoryError:
        raise FetchError("not an object: a folder") from None
    except OSError as exc:
        raise FetchError(f"cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
            raise FetchError(f"not an object: {kind}")
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)   # a file that grows while read is still cut at the limit
        if len(data) > max_bytes:
            raise _too_large(f"over {max_bytes}", max_bytes)
        return data
    except OSError as exc:
        raise FetchError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _fetch_s3(uri: str, policy: FetchPolicy, max_bytes: int, deadline: float) -> bytes:
    from botocore.exceptions import (BotoCoreError, ClientError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)

    bucket, _, key = uri[len("s3://"):].partition("/")  # keys are literal: no URL decoding, '#' and '?' kept
    if not bucket or not key:
        raise FetchError("malformed S3 URI: expected s3://bucket/key")
    # botocore retries a request until its answer's headers arrive, not the reading of its body:
    # a connection dropped or stalled mid-body is retried here, as patiently.
    for attempt in range(1, policy.max_attempts + 1):
        try:
            answer = s3_client(policy).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FetchError("object not found") from None
            if code == "NoSuchBucket":
                raise FetchError(f"bucket not found: {bucket}") from None
            if code in ("AccessDenied", "403", "Forbidden"):
                raise FetchError("access denied") from None
            raise FetchError(f"S3 error {code or 'unknown'} after {policy.max_attempts} attempts") from None
        except BotoCoreError as exc:
            raise FetchError(f"cannot reach the object store after {policy.max_attempts} attempts: {exc}") from None
        body = answer["Body"]
        try:
            if answer.get("ContentLength", 0) > max_bytes:
                raise _too_large(answer["ContentLength"], max_bytes)
            return _read_body(body, max_bytes, deadline)
        except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError) as exc:
            if attempt == policy.max_attempts:
                raise FetchError(f"the connection broke while reading the object, {attempt} times: {exc}") from None
            time.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** attempt)))  # backoff with jitter
        finally:
            body.close()
        if time.monotonic() > deadline:
            break
    raise FetchError("the object could not be read within the fetch timeout")


def _read_body(body, max_bytes: int, deadline: float) -> bytes:
    """An S3 body read in chunks, at most ``max_bytes``, ending at ``deadline`` however slowly it arrives."""
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError(f"the object could not be read within the fetch timeout ({total} bytes read)")
        chunk = body.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"over {max_bytes}", max_bytes)
        chunks.append(chunk)
