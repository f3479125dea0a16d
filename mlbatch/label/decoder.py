"""Decode helper processes for the fused layout: fetch + decode outside the actor's GIL.

A fused labeler (``job.UnitLabeler``) decodes in threads of its own process at ~1,100 img/s on
2 cores, held back by the GIL's share of each decode; two processes reach ~1,400 (NOTES). So each
labeler starts a few of these helpers, plain child processes that speak a minimal protocol over
their stdin and a private copy of their stdout:

    request   one JSON line: {"uris": [...], "size": S, "max_pixels": N, "fetch_only": false}
    reply     per URI, in order: b"P" + 4-byte length + resized RGB pixels (or the object's bytes with
              fetch_only, for ``--decode torchvision``), or b"E" + length + reason

JSON and raw bytes, never pickle; no multiprocessing, whose semaphore tracker dies inside Ray's
actors and then prints tracebacks into every run. A helper that dies is restarted and its batch
decoded in the labeler's own threads instead, so a crash costs speed, never rows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from ..core import images, storage

log = logging.getLogger(__name__)

Result = tuple[bytes | None, str | None]


def decode_uris(uris: list[str | None], size: int, max_pixels: int = images.DEFAULT_MAX_PIXELS,
                threads: int = 16, fetch_only: bool = False) -> list[Result]:
    """Fetch and decode images to resized uint8 pixels, or the reason one could not be read.

    Fetches run in a thread pool (I/O bound). The split layout's decode tasks and the fused
    layout's helper processes both call this (it lives here so that a helper starts without
    importing Ray). ``fetch_only``: the objects' bytes as they are, for a predictor that decodes
    them itself (``--decode torchvision``).
    """
    def one(uri: str | None) -> Result:
        try:
            data = storage.fetch(uri)
            if fetch_only:
                return data, None
            pic = images.decode(data, max_pixels=max_pixels, draft_size=size)
            return images.resize(pic, size).tobytes(), None
        except (storage.FetchError, images.ImageError) as exc:
            return None, str(exc)
        except Exception as exc:  # never let one object kill the job; say what happened
            return None, f"unexpected {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


class Helper:
    """One helper process: ``send`` a batch of URIs, then ``receive`` its results in order."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlbatch.label.decoder"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def send(self, uris: list[str | None], size: int, max_pixels: int, fetch_only: bool = False) -> None:
        assert self.proc.stdin is not None
        request = {"uris": uris, "size": size, "max_pixels": max_pixels, "fetch_only": fetch_only}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, n: int) -> list[Result]:
        assert self.proc.stdout is not None
        out: list[Result] = []
        for _ in range(n):
            head = _read_exactly(self.proc.stdout, 5)
            body = _read_exactly(self.proc.stdout, int.from_bytes(head[1:], "little"))
            out.append((body, None) if head[:1] == b"P" else (None, body.decode()))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("decode helper ended")
    return data


class HelperPool:
    """A few helpers; ``decode`` splits a batch over them and falls back to threads if one fails."""

    def __init__(self, processes: int) -> None:
        self.helpers = [Helper() for _ in range(processes)]

    def decode(self, uris: list[str | None], size: int, max_pixels: int, fetch_only: bool = False) -> list[Result]:
        step = -(-len(uris) // len(self.helpers)) or 1
        parts = [uris[i:i + step] for i in range(0, len(uris), step)]
        sent = []
        for helper, part in zip(self.helpers, parts):
            try:
                helper.send(part, size, max_pixels, fetch_only)
                sent.append(True)
            except OSError:
                sent.append(False)
        results: list[Result] = []
        for k, part in enumerate(parts):
            helper = self.helpers[k]
            try:
                if not sent[k]:
                    raise EOFError("decode helper ended")
                results += helper.receive(len(part))
            except (EOFError, OSError) as exc:
                log.warning("decode helper %d failed (%s): decoding its %d images here, restarting it",
                            helper.proc.pid, exc, len(part))
                helper.proc.kill()
                self.helpers[k] = Helper()
                results += decode_uris(part, size, max_pixels, fetch_only=fetch_only)
        return results

    def close(self) -> None:
        for helper in self.helpers:
            helper.close()


def serve() -> None:
    """The helper's loop: requests on stdin, replies on a private copy of stdout (print goes to stderr)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for line in sys.stdin.buffer:
        req = json.loads(line)
        for pixels, error in decode_uris(req["uris"], req["size"], req["max_pixels"], threads=8,
                                         fetch_only=req.get("fetch_only", False)):
            body = pixels if pixels is not None else (error or "").encode()
            out.write((b"P" if pixels is not None else b"E") + len(body).to_bytes(4, "little") + body)
        out.flush()


if __name__ == "__main__":
    serve()
