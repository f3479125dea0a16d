"""Decode helper processes for the fused layout: fetch + decode outside the actor's GIL.

A fused labeler (``job.UnitLabeler``) decodes in threads of its own process at ~1,100 img/s on
2 cores, held back by the GIL's share of each decode; two processes reach ~1,400 (NOTES). So each
labeler starts a few of these helpers, plain child processes that speak a minimal protocol over
their stdin and a private copy of their stdout:

    request   one JSON line: {"uris": [...], "size": S, "max_pixels": N, "max_bytes": B, "fetch_only": false}
    reply     per URI, in order: b"P" + 4-byte length + resized RGB pixels (or the object's bytes with
              fetch_only, for ``--decode torchvision``), or b"E" + length + reason

JSON and raw bytes, never pickle; no multiprocessing, whose semaphore tracker dies inside Ray's
actors and then prints tracebacks into every run. A reply must come within a time that the fetch
timeout bounds. A helper that dies or does not answer is killed and its batch sent to a fresh
one; if that one fails too, its images go one by one, each to a live helper, and an image whose
helper fails on it becomes an error row. So a poison image (one that crashes or hangs a decoder)
costs a few helper starts and one error row; it is never decoded in the labeler itself, where it
would take the actor, and Ray's retries of it, down with it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ..core import fetch, images

log = logging.getLogger(__name__)

Result = tuple[bytes | None, str | None]


HELPER_THREADS = 8
# a reply may take this long per round of HELPER_THREADS fetches: the fetch timeout, and time to decode
ROUND_SECONDS = fetch.DEFAULT_TIMEOUT + 60.0


def decode_uris(uris: list[str | None], size: int, max_pixels: int = images.DEFAULT_MAX_PIXELS,
                threads: int = 16, fetch_only: bool = False, max_bytes: int = fetch.DEFAULT_MAX_BYTES) -> list[Result]:
    """Fetch and decode images to resized uint8 pixels, or the reason one could not be read.

    Fetches run in a thread pool (I/O bound). The split layout's decode tasks and the fused
    layout's helper processes both call this (it lives here so that a helper starts without
    importing Ray). ``fetch_only``: the objects' bytes as they are, for a predictor that decodes
    them itself (``--decode torchvision``).
    """
    def one(uri: str | None) -> Result:
        try:
            data = fetch.fetch(uri, max_bytes=max_bytes)
            if fetch_only:
                return data, None
            pic = images.decode(data, max_pixels=max_pixels, draft_size=size)
            return images.resize(pic, size).tobytes(), None
        except (fetch.FetchError, images.ImageError) as exc:
            return None, str(exc)
        except Exception as exc:  # never let one object kill the job; say what happened
            return None, f"unexpected {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


class HelperFailed(Exception):
    """A helper died or did not answer in time."""


class Helper:
    """One helper process: ``send`` a batch of URIs, then ``receive`` its results in order."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlbatch.label.decoder"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)

    def send(self, uris: list[str | None], size: int, max_pixels: int, max_bytes: int, fetch_only: bool) -> None:
        assert self.proc.stdin is not None
        request = {"uris": uris, "size": size, "max_pixels": max_pixels, "max_bytes": max_bytes,
                   "fetch_only": fetch_only}
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise HelperFailed(f"decode helper ended ({exc})") from None

    def receive(self, n: int) -> list[Result]:
        """``n`` results, each within its share of the time a batch of ``n`` may take."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ROUND_SECONDS * -(-n // HELPER_THREADS)
        fd, out = self.proc.stdout.fileno(), []
        for _ in range(n):
            head = _read_exactly(fd, 5, deadline)
            body = _read_exactly(fd, int.from_bytes(head[1:], "little"), deadline)
            out.append((body, None) if head[:1] == b"P" else (None, body.decode()))
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


def _read_exactly(fd: int, n: int, deadline: float) -> bytes:
    chunks, left = [], n
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise HelperFailed(f"decode helper did not answer within {ROUND_SECONDS:.0f} s per "
                               f"{HELPER_THREADS} images")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise HelperFailed("decode helper ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class HelperPool:
    """A few helpers; ``decode`` splits a batch over them, and a batch whose helper fails is retried."""

    def __init__(self, processes: int) -> None:
        self.helpers = [Helper() for _ in range(processes)]

    def decode(self, uris: list[str | None], size: int, max_pixels: int, max_bytes: int = fetch.DEFAULT_MAX_BYTES,
               fetch_only: bool = False) -> list[Result]:
        args = (size, max_pixels, max_bytes, fetch_only)
        step = -(-len(uris) // len(self.helpers)) or 1
        parts = [uris[i:i + step] for i in range(0, len(uris), step)]
        failed: dict[int, HelperFailed] = {}
        for k, part in enumerate(parts):
            try:
                self.helpers[k].send(part, *args)
            except HelperFailed as exc:
                failed[k] = exc
        results: list[Result] = []
        for k, part in enumerate(parts):
            try:
                if k in failed:
                    raise failed[k]
                results += self.helpers[k].receive(len(part))
            except HelperFailed as exc:
                results += self._retry(k, part, args, exc)
        return results

    def _restart(self, k: int) -> Helper:
        self.helpers[k].kill()
        self.helpers[k] = Helper()
        return self.helpers[k]

    def _retry(self, k: int, part: list[str | None], args: tuple, first: HelperFailed) -> list[Result]:
        """A failed helper's batch: again in a fresh helper, then one image at a time (a failure: an error row)."""
        log.warning("decode helper %d failed (%s): its %d images go to a fresh helper", self.helpers[k].proc.pid,
                    first, len(part))
        try:
            helper = self._restart(k)
            helper.send(part, *args)
            return helper.receive(len(part))
        except HelperFailed as exc:
            log.warning("decode helper failed again (%s): its %d images go one at a time", exc, len(part))
        out: list[Result] = []
        helper = self._restart(k)
        for uri in part:
            try:
                helper.send([uri], *args)
                out += helper.receive(1)
            except HelperFailed as exc:
                helper = self._restart(k)
                out.append((None, f"this image ends or stalls its decoder ({exc}); left as an error row"))
        return out

    def close(self) -> None:
        for helper in self.helpers:
            helper.close()


def serve() -> None:
    """The helper's loop: requests on stdin, replies on a private copy of stdout (print goes to stderr)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for line in sys.stdin.buffer:
        req = json.loads(line)
        for pixels, error in decode_uris(req["uris"], req["size"], req["max_pixels"], threads=HELPER_THREADS,
                                         fetch_only=req.get("fetch_only", False),
                                         max_bytes=req.get("max_bytes", fetch.DEFAULT_MAX_BYTES)):
            body = pixels if pixels is not None else (error or "").encode()
            out.write((b"P" if pixels is not None else b"E") + len(body).to_bytes(4, "little") + body)
        out.flush()


if __name__ == "__main__":
    serve()
