"""Registering: a package copied into the registry under its name and version."""

from __future__ import annotations

import json
import logging
from typing import Any

from ..core import storage
from ..core.names import NameError_, check_inside, check_segment
from ..model.package import META_FILE, WEIGHTS_FILE, read_package
from ..model.refs import RegistryError, resolve, version_uri

log = logging.getLogger(__name__)


def register(model_uri: str, registry: str, name: str | None = None) -> dict[str, Any]:
    """Copy a package into the registry under its name and version; registering it again changes nothing.

    The weights are written before the description, each whole or not at all (``storage.write_atomic``),
    so a version is visible (``versions``, ``resolve``) only once it is whole. A version already there
    counts as registered only if it reads back as the same package; a torn or foreign one is written again.
    """
    meta, weights = read_package(resolve(model_uri))   # checked: digest, format, labels, every path segment
    name = name or meta["name"]
    try:
        check_segment(name, "model name")
    except NameError_ as exc:
        raise RegistryError(str(exc)) from None
    target = version_uri(registry, name, meta["version"])
    if not storage.is_remote(target):   # a link inside the registry must not lead the write out of it
        try:
            check_inside(storage.local_path(registry), storage.local_path(target), f"registering {name}")
        except NameError_ as exc:
            raise RegistryError(str(exc)) from None
    ref = f"{registry.rstrip('/')}/{name}@{meta['version']}"
    if storage.exists(storage.join(target, META_FILE)):
        if _same_package(target, meta):
            log.info("%s is already registered", ref)
            return {"name": name, "version": meta["version"], "uri": target, "ref": ref, "created": False}
        log.warning("%s was there but does not read back as this package (cut, or written by something "
                    "else): writing it again", ref)
    storage.write_atomic(storage.join(target, meta["weights"].get("file", WEIGHTS_FILE)), weights)
    storage.write_atomic(storage.join(target, META_FILE), (json.dumps(meta, indent=2) + "\n").encode())
    log.info("registered %s", ref)
    return {"name": name, "version": meta["version"], "uri": target, "ref": ref, "created": True}


def _same_package(target: str, meta: dict[str, Any]) -> bool:
    """Whether the registered version at ``target`` reads (digest and format checked) as ``meta``'s package."""
    try:
        there, _ = read_package(target)
    except Exception:  # whatever keeps it from reading (cut, foreign, another digest): not this package
        return False
    return there.get("version") == meta["version"] and there.get("weights") == meta["weights"]
