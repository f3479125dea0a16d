"""Compare-and-swap of one small object that several writers may race to replace: a lease, a night's
state, a registry alias.

``read_versioned`` gives the bytes and a token; ``swap`` (and ``write_if``) writes only if the object
is still the version the token names. On S3 a conditional PutObject, which the server decides; on a
local disk a check and an atomic rename under ``flock``. A conditional write whose answer was lost is
resolved by reading the object back, never guessed (``swap``).
"""

from __future__ import annotations

import hashlib
import logging
import os

from . import storage
from .faults import FAULTS

log = logging.getLogger(__name__)


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The bytes of a small object and a token for ``write_if`` (None, None when it is absent).

    The token is the object's ETag on S3 and the sha256 of the bytes on a local disk.
    """
    if storage.is_s3(uri):
        return _read_s3(uri)
    try:
        with open(os.path.abspath(storage.local_path(uri)), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def _read_s3(uri: str, tries: int = 4) -> tuple[bytes | None, str | None]:
    """``read_versioned`` on S3. botocore retries a request, not a body cut half way (a reset while it
    streams): such a read is made again, a few times, before it fails."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    for left in range(tries - 1, -1, -1):
        try:
            answer = storage.s3_client().get_object(Bucket=bucket, Key=key)
            return answer["Body"].read(), answer["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise OSError(f"cannot read {uri}: {exc}") from None
        except BotoCoreError as exc:
            if not left:
                raise OSError(f"cannot read {uri}: {exc}") from None
    raise AssertionError("unreachable")


def write_if(uri: str, data: bytes, token: str | None) -> bool:
    """``swap`` that only says whether it won."""
    return swap(uri, data, token) is not None


def swap(uri: str, data: bytes, token: str | None) -> str | None:
    """Replace ``uri`` with ``data`` only if it is still the version ``token`` names (absent for None).

    Returns the new version's token, or None, writing nothing, when another writer got there first. On S3 this is a
    conditional PutObject (``If-Match: <etag>``, or ``If-None-Match: *`` to create), which AWS S3
    and MinIO decide atomically on the server; locally the check and an atomic rename happen
    under an exclusive ``flock`` on ``<uri>.lock``.

    A conditional write's outcome is never guessed. When its answer is lost after the server applied it,
    the client's retry meets the condition it just changed (412), or the retries run out; then the
    object is read back, and if it holds exactly ``data`` the write landed and its token is returned.
    Every caller's document names its writer (an owner, a run, a decision), so equal bytes are this
    write, or one with the same meaning.
    """
    FAULTS.point()
    if storage.is_s3(uri):
        return _lost_reply(uri, data) if (landed := _swap_s3(uri, data, token)) and FAULTS.reply_lost() else landed
    import fcntl

    path = os.path.abspath(storage.local_path(uri))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, even if this process dies
        _, current = read_versioned(path)
        if current != token:
            return None
        FAULTS.locked = True
        try:
            storage.write_atomic(path, data)
        finally:
            FAULTS.locked = False
    return _lost_reply(uri, data) if FAULTS.reply_lost() else hashlib.sha256(data).hexdigest()


def _lost_reply(uri: str, data: bytes) -> str | None:
    """An applied conditional write whose answer is lost (a crash-point test): resolved as a lost answer is."""
    log.info("%s: the answer of an applied conditional write is treated as lost (MLBATCH_LOSE_REPLY_AT)", uri)
    return _landed(uri, data)


def _swap_s3(uri: str, data: bytes, token: str | None) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
    try:
        return storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 412: the condition failed; 409: a concurrent conditional write won; 404: deleted meanwhile.
        # Each may be the retry of a try that landed: read back before saying another writer won
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
            return _landed(uri, data)
        failure: Exception = exc
    except BotoCoreError as exc:   # the retries ran out (timeouts, resets): did one of them land?
        failure = exc
    landed = _landed(uri, data)
    if landed is None:
        raise OSError(f"cannot write {uri}: {failure}") from None
    return landed


def _landed(uri: str, data: bytes) -> str | None:
    """The object's token if it holds exactly ``data`` (this write landed), else None."""
    there, token = read_versioned(uri)
    if there != data:
        return None
    log.info("%s: a conditional write whose answer was lost had landed", uri)
    return token
