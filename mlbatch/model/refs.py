"""Registry references and the registry's layout: a leaf that names and resolves, and nothing else.

    REGISTRY/NAME/versions/VERSION/                   a model package, exactly as ``train`` wrote it
    REGISTRY/NAME/aliases/champion.json               the alias: {"version", "generation", "previous", ...}
    REGISTRY/NAME/aliases/champion/<time>-<VERSION>/  one promotion's evidence

A *model reference* ``REGISTRY/NAME@champion`` or ``REGISTRY/NAME@VERSION`` works wherever a model
URI does (``label``, ``nightly``, ``evaluate``, ``train --backbone-weights``): ``resolve`` is the one
place that turns it into a package URI. Whoever needs a package resolves once (a labeling run
does, so all its actors load the same version and ``_run.json`` records it); ``read_package``
never resolves.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from ..core import storage, versioned
from ..core.names import SEGMENT_RE
from .package import META_FILE, PackageError

log = logging.getLogger(__name__)

CHAMPION = "champion"
VERSIONS_DIR = "versions"
ALIASES_DIR = "aliases"
_REF_RE = re.compile(rf"^(?P<registry>.+)/(?P<name>{SEGMENT_RE})@(?P<ref>{SEGMENT_RE})$")


class RegistryError(PackageError):
    """A registry, a model in it or a version of it is missing, or a request makes no sense."""


@dataclass(frozen=True)
class Ref:
    registry: str
    name: str
    ref: str          # "champion" or a version

    def __str__(self) -> str:
        return f"{self.registry}/{self.name}@{self.ref}"


def parse_ref(uri: str) -> Ref | None:
    """``REGISTRY/NAME@REF`` -> Ref; any other URI (a package folder) -> None."""
    m = _REF_RE.match(uri.rstrip("/"))
    return Ref(m["registry"], m["name"], m["ref"]) if m else None


def version_uri(registry: str, name: str, version: str) -> str:
    return storage.join(registry, name, VERSIONS_DIR, version)


def alias_uri(registry: str, name: str, alias: str = CHAMPION) -> str:
    return storage.join(registry, name, ALIASES_DIR, f"{alias}.json")


def versions(registry: str, name: str) -> list[str]:
    """The versions of ``name`` in the registry (those whose description is written), sorted."""
    base = storage.join(registry, name, VERSIONS_DIR)
    return sorted({posixpath.basename(posixpath.dirname(e.uri)) for e in storage.list_files(base)
                   if posixpath.basename(e.uri) == META_FILE})


def read_alias(registry: str, name: str, alias: str = CHAMPION) -> tuple[dict[str, Any] | None, str | None]:
    """The alias document and its compare-and-swap token; (None, None) before the first promotion."""
    uri = alias_uri(registry, name, alias)
    raw, token = versioned.read_versioned(uri)
    if raw is None:
        return None, None
    doc = storage.json_object(raw)
    if doc is None or not isinstance(doc.get("version"), str):
        raise RegistryError(f"{uri} is not an alias document (cut, or made by something else): no model can be "
                            f"resolved through it; delete it and promote a version again")
    return doc, token


def resolve(uri: str) -> str:
    """The package URI a model URI names: a reference is looked up, anything else is returned as it is.

    Anything shaped ``.../NAME@REF`` is a reference, even if a folder of that name exists: the champion
    is what the alias file says (changed only by compare-and-swap), never a folder someone made.
    """
    ref = parse_ref(uri)
    if ref is None:
        return uri
    version = ref.ref
    if ref.ref == CHAMPION:
        doc, _ = read_alias(ref.registry, ref.name)
        if doc is None:
            known = versions(ref.registry, ref.name)
            if not known:
                raise RegistryError(f"{ref}: the registry {ref.registry} has no model {ref.name!r}")
            raise RegistryError(f"{ref}: {ref.name!r} has no champion yet (versions: {', '.join(known)}); "
                                f"promote one with: mlbatch models promote {ref.name}@VERSION --registry {ref.registry}")
        version = doc["version"]
    target = version_uri(ref.registry, ref.name, version)
    if not storage.exists(storage.join(target, META_FILE)):
        known = versions(ref.registry, ref.name)
        if not known:
            raise RegistryError(f"{ref}: the registry {ref.registry} has no model {ref.name!r}")
        raise RegistryError(f"{ref}: {ref.name!r} has no version {version!r} (versions: {', '.join(known)})")
    log.info("model %s is %s", ref, target)
    return target
