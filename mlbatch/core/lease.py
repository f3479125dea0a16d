"""One writer per output: a lease taken by compare-and-swap before anything is written.

    OUTPUT/_lease.json   {"owner", "epoch", "run", "host", "boot", "pidns", "pid", "acquired_at", "heartbeat_at",
                          "expires_at"}

``Lease.acquire`` creates the lease object only if it is absent (S3 ``If-None-Match: *``, locally an
exclusive check under ``flock``: ``versioned.swap``), or replaces one whose holder stopped renewing
it (its ``expires_at`` passed, or it ran in this process table, the same host, boot and PID namespace,
and its process is gone) only if it is still
the version that was read (``If-Match``). A
thread renews it every third of its time to live while the run lives; ``release`` marks it expired
at the end, by the same compare-and-swap. A lease lost to someone else (this holder stalled for a
whole time to live) is noticed by the renewal, and ``check`` then refuses to commit.

**Fencing.** Each take of the lease has a new *epoch*, one more than the last holder's, and a new
owner id. A ``Fence`` (the lease's object, owner and epoch: small, picklable, for any worker)
says whether the lease is still this take's by reading the lease object; every write that a reader
or a resume counts is made only after that check, and an unrenewed holder that wakes after
another took over finds it lost before its next such write.

Times are the holders' wall clocks: keep the time to live well above the clock skew of the hosts
that may share an output (minutes, not seconds).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import storage, versioned

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_SECONDS = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds the output; nothing was touched."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stopped renewing for a whole time to live): it must not commit."""


def lease_uri(folder: str) -> str:
    """The lease object of an output folder."""
    return storage.join(folder, LEASE_FILE)


def _describe(doc: dict[str, Any], now: float) -> str:
    beat = now - float(doc.get("heartbeat_at", 0))
    left = float(doc.get("expires_at", 0)) - now
    return (f"run {doc.get('run')!r} (owner {doc.get('owner')}, host {doc.get('host')}, pid {doc.get('pid')}; "
            f"last heartbeat {beat:.0f} s ago, expires in {max(left, 0):.0f} s)")


@functools.cache
def _here() -> dict[str, str | None]:
    """Where a process id means this process table: the host name, this boot, this PID namespace (read once:
    none changes while a process lives). Two containers with ``--network host`` (or pods with
    ``hostNetwork``) share a host name, not their pids."""
    def read(path: str, link: bool = False) -> str | None:
        try:
            if link:
                return os.readlink(path)
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid", link=True)}


def _dead_here(doc: dict[str, Any]) -> bool:
    """The holder ran in this process table (same host, boot and PID namespace) and its process is gone
    (killed): no need to wait for the expiry. Anything less certain waits for the expiry."""
    here = _here()
    if None in here.values() or any(doc.get(k) != v for k, v in here.items()) or not isinstance(doc.get("pid"), int):
        return False
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Fence:
    """One take of an output's lease, as a worker carries it: what it checks before a write that counts."""

    uri: str
    owner: str
    epoch: int

    def lost(self) -> str | None:
        """Why this take no longer holds the lease, or None: another took it over, it was released, or its
        holder stopped renewing it (under a third of its time to live is left, by this host's clock), so it
        may be taken over before a write begun now ends."""
        raw, _ = versioned.read_versioned(self.uri)
        doc = storage.json_object(raw)
        if doc is None:
            return "the lease is gone" if raw is None else "the lease is not one (cut, or made by something else)"
        if doc.get("owner") != self.owner or doc.get("epoch") != self.epoch:
            return f"epoch {doc.get('epoch')} of the lease, {_describe(doc, time.time())}, took it over"
        if "released_at" in doc:
            return "the lease was released"
        left, ttl = float(doc.get("expires_at", 0)) - time.time(), float(doc.get("expires_at", 0)) - float(
            doc.get("heartbeat_at", 0))
        if left < ttl / 3:
            return f"its holder has not renewed it for {ttl - left:.0f} s of its {ttl:.0f} s"
        return None

    def check(self) -> None:
        """Raise ``LeaseLost`` if this take no longer holds the lease."""
        why = self.lost()
        if why is not None:
            raise LeaseLost(f"output {self.uri.rsplit('/', 1)[0]}: this run (lease epoch {self.epoch}) no longer "
                            f"holds its lease: {why}; it stopped before writing anything more")


def _epoch(held: dict[str, Any] | None) -> int:
    """The epoch after the one ``held`` names (1 for none, or a lease that names no number)."""
    last = held.get("epoch") if held else None
    return last + 1 if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else 1


@dataclass
class Lease:
    """The lease of one output folder, for one run."""

    folder: str
    run: str
    ttl: float = DEFAULT_TTL_SECONDS
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    epoch: int = 0                  # set when taken
    _token: str | None = None
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def uri(self) -> str:
        return lease_uri(self.folder)

    def _doc(self, acquired_at: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "epoch": self.epoch, "run": self.run, **_here(), "pid": os.getpid(),
                           "acquired_at": acquired_at or now, "heartbeat_at": now,
                           "expires_at": now + self.ttl}).encode()

    def acquire(self) -> Lease:
        """Take the lease, or raise ``LeaseHeld`` naming the live holder; starts the renewal."""
        if self.ttl <= 0:
            raise ValueError(f"--lease-seconds {self.ttl}: must be positive")
        raw, token = versioned.read_versioned(self.uri)
        held = storage.json_object(raw)
        if raw is not None and held is None:   # a short read under load: read once more before judging it
            raw, token = versioned.read_versioned(self.uri)
            held = storage.json_object(raw)
        now = time.time()
        if held is not None:
            if held.get("owner") != self.owner and float(held.get("expires_at", 0)) > now and not _dead_here(held):
                raise LeaseHeld(f"output {self.folder} is being written by {_describe(held, now)}; this run "
                                "touched nothing. Wait for it to finish, or for its lease to expire if it died")
        self.epoch = _epoch(held)
        self._token = versioned.swap(self.uri, self._doc(), token)
        if self._token is None:
            again, _ = versioned.read_versioned(self.uri)
            other = storage.json_object(again) or {}
            raise LeaseHeld(f"output {self.folder} was just taken by {_describe(other, time.time())}; "
                            "this run touched nothing")
        if raw is not None:
            if held is None:   # no mlbatch run writes a lease that does not parse: nobody holds it
                log.warning("output %s: took over %s, which is not a lease (cut, or made by something else)",
                            self.folder, self.uri)
            elif "released_at" in held:   # the normal end of the last run: nothing to warn of
                log.info("output %s: lease taken; run %r released it", self.folder, held.get("run"))
            else:
                log.warning("output %s: took over the expired lease of %s", self.folder, _describe(held, now))
        self._thread = threading.Thread(target=self._renew_loop, name="mlbatch-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        acquired = time.time()
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew(acquired)
            except Exception as exc:   # a failed renewal is retried at the next beat; expiry is the judge
                log.warning("output %s: could not renew the lease: %s", self.folder, exc)

    def renew(self, acquired_at: float | None = None) -> None:
        """Extend the lease by its time to live, if it is still ours."""
        with self._lock:
            if self._lost or self._token is None:
                return
            token = versioned.swap(self.uri, self._doc(acquired_at), self._token)
            if token is not None:
                self._token = token
                return
            raw, _ = versioned.read_versioned(self.uri)
            other = storage.json_object(raw) or {}
            self._lost = _describe(other, time.time()) if other else "nobody (the lease is gone)"
            log.error("output %s: lease lost to %s", self.folder, self._lost)

    @property
    def fence(self) -> Fence:
        """This take of the lease, for the workers to check before each write that counts."""
        return Fence(self.uri, self.owner, self.epoch)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this take still holds the lease: read from the lease object, not only
        from the renewal's last answer (a holder paused for a whole time to live has not heard it)."""
        if self._lost:
            raise LeaseLost(f"output {self.folder}: this run's lease was taken over by {self._lost} while it "
                            "ran; it did not commit")
        self.fence.check()

    def release(self) -> None:
        """Stop renewing and mark the lease expired (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self._lost or self._token is None:
                return
            done = json.loads(self._doc())
            done.update(expires_at=0.0, released_at=time.time())
            versioned.swap(self.uri, json.dumps(done).encode(), self._token)
            self._token = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
