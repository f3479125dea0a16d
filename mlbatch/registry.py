"""A model registry in object storage: packages by name and version, and a ``champion`` alias.

    REGISTRY/NAME/versions/VERSION/                   a model package, exactly as ``train`` wrote it
    REGISTRY/NAME/aliases/champion.json               the alias: {"version", "generation", "previous", ...}
    REGISTRY/NAME/aliases/champion/<time>-<VERSION>/  one promotion's evidence: decision.json and the
                                                      metrics.json of the candidate and of the champion

A *model reference* ``REGISTRY/NAME@champion`` or ``REGISTRY/NAME@VERSION`` works wherever a model
URI does (``label``, ``nightly``, ``evaluate``, ``train --backbone-weights``): ``resolve`` is the one
place that turns it into a package URI, and a labeling run resolves once, so all its actors load
the same version and ``_run.json`` records it.

Promotion moves the alias only when the candidate beats the champion on the same evaluation
manifests (``decide``), and only by a compare-and-swap of the alias object
(``storage.write_if``): two promotions at once cannot both win against the same champion; the
one that loses the swap compares itself again with the new champion.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import storage
from .package import META_FILE, PackageError

log = logging.getLogger(__name__)

CHAMPION = "champion"
VERSIONS_DIR = "versions"
ALIASES_DIR = "aliases"
METRICS = ("macro_f1", "micro_f1", "mean_average_precision", "subset_accuracy")  # higher is better
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_REF_RE = re.compile(rf"^(?P<registry>.+)/(?P<name>{_NAME})@(?P<ref>{_NAME})$")


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
    raw, token = storage.read_versioned(alias_uri(registry, name, alias))
    return (json.loads(raw), token) if raw is not None else (None, None)


def resolve(uri: str) -> str:
    """The package URI a model URI names: a reference is looked up, anything else is returned as it is.

    A package folder whose own name happens to contain an ``@`` stays a package folder.
    """
    ref = parse_ref(uri)
    if ref is None or storage.exists(storage.join(uri, META_FILE)):
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


# ---- registering ---------------------------------------------------------------------------

def register(model_uri: str, registry: str, name: str | None = None) -> dict[str, Any]:
    """Copy a package into the registry under its name and version; registering it again changes nothing.

    The weights are written before the description, so a version is visible (``versions``,
    ``resolve``) only once it is whole.
    """
    from .package import WEIGHTS_FILE, read_package

    meta, weights = read_package(model_uri)   # checked: digest, format, labels
    name = name or meta["name"]
    if not re.fullmatch(_NAME, name):
        raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (a path segment)")
    target = version_uri(registry, name, meta["version"])
    ref = f"{registry.rstrip('/')}/{name}@{meta['version']}"
    if storage.exists(storage.join(target, META_FILE)):
        log.info("%s is already registered", ref)
        return {"name": name, "version": meta["version"], "uri": target, "ref": ref, "created": False}
    storage.write_bytes(storage.join(target, meta["weights"].get("file", WEIGHTS_FILE)), weights)
    storage.write_text(storage.join(target, META_FILE), json.dumps(meta, indent=2) + "\n")
    log.info("registered %s", ref)
    return {"name": name, "version": meta["version"], "uri": target, "ref": ref, "created": True}


# ---- promoting -----------------------------------------------------------------------------

@dataclass
class PromoteConfig:
    """Promote ``candidate`` (``NAME@VERSION``) to champion of ``registry`` if it wins on ``manifests``."""

    candidate: str
    registry: str
    manifests: list[str]
    metric: str = "macro_f1"
    min_gain: float = 0.0          # candidate - champion must be at least this (and above 0)
    max_label_drop: float = 0.05   # no label's F1 may fall by more than this
    attempts: int = 5              # compare-and-swap rounds before giving up
    alias: str = CHAMPION


@dataclass
class Decision:
    candidate: str
    champion: str | None
    metric: str
    candidate_score: float
    champion_score: float | None
    gain: float | None
    label_f1: dict[str, dict[str, float | None]]
    promoted: bool
    reason: str
    reports: str = ""
    alias: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate, champion, config: PromoteConfig) -> tuple[bool, str, dict[str, dict[str, float | None]]]:
    """The promotion rule on two evaluation reports of the same manifests.

    Promote when there is no champion yet, or when the candidate has every label of the
    champion, candidate - champion on ``metric`` is above zero and at least ``min_gain``, and no
    label has lost more than ``max_label_drop`` of F1. Returns (promote?, why, per-label F1 of both).
    """
    cand_f1 = {m.label: m.f1 for m in candidate.per_label}
    champ_f1 = {m.label: m.f1 for m in champion.per_label} if champion else {}
    per_label = {label: {"candidate": f1, "champion": champ_f1.get(label),
                         "change": f1 - champ_f1[label] if label in champ_f1 else None}
                 for label, f1 in cand_f1.items()}
    if champion is None:
        return True, "no champion yet", per_label
    lost = [label for label in champ_f1 if label not in cand_f1]
    if lost:
        return False, f"the candidate lacks the champion's label(s) {', '.join(lost)}", per_label
    score, best = getattr(candidate, config.metric), getattr(champion, config.metric)
    gain = score - best
    dropped = {label: -v["change"] for label, v in per_label.items()
               if v["change"] is not None and -v["change"] > config.max_label_drop}
    if dropped:
        worst = max(dropped, key=dropped.get)
        return False, (f"label {worst!r} F1 fell by {dropped[worst]:.3f} (> --max-label-drop "
                       f"{config.max_label_drop})"), per_label
    if not gain > 0:   # NaN (a metric undefined on these manifests) never promotes
        return False, f"{config.metric} {score:.4f} does not beat champion {best:.4f} ({gain:+.4f})", per_label
    if gain < config.min_gain:
        return False, (f"{config.metric} {score:.4f} vs champion {best:.4f}: gain {gain:+.4f} below --min-gain "
                       f"{config.min_gain}"), per_label
    return True, f"{config.metric} {score:.4f} vs champion {best:.4f}: gain {gain:+.4f}", per_label


def promote(config: PromoteConfig) -> Decision:
    """Evaluate candidate and champion on the same manifests and move the alias if the candidate wins.

    Nothing is written before both evaluations succeed (a manifest lacking a label, a missing
    version: an error, nothing changed). Every decision, refused ones included, leaves its
    evidence under ``aliases/champion/<time>-<VERSION>/``. If the alias moved while this one
    was comparing, it compares again with the new champion (up to ``attempts`` times).
    """
    from .evaluate import evaluate

    name, _, version = config.candidate.partition("@")
    if not name or not version:
        raise RegistryError(f"{config.candidate!r}: expected NAME@VERSION")
    if config.metric not in METRICS:
        raise RegistryError(f"--metric {config.metric!r}: use one of {', '.join(METRICS)}")
    candidate_uri = resolve(f"{config.registry.rstrip('/')}/{name}@{version}")
    reports: dict[str, Any] = {}

    def report(v: str):
        if v not in reports:
            reports[v] = evaluate(version_uri(config.registry, name, v), config.manifests)
        return reports[v]

    candidate = report(version)
    alias = alias_uri(config.registry, name, config.alias)
    for attempt in range(config.attempts):
        doc, token = read_alias(config.registry, name, config.alias)
        current = doc["version"] if doc else None
        if current == version:
            return Decision(version, current, config.metric, getattr(candidate, config.metric), None, None, {},
                            False, f"{version} is already the {config.alias}", alias=doc or {})
        champion = report(current) if current else None
        promoted, reason, per_label = decide(candidate, champion, config)
        score = getattr(candidate, config.metric)
        best = getattr(champion, config.metric) if champion else None
        decision = Decision(version, current, config.metric, score, best, None if best is None else score - best,
                            per_label, promoted, reason)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        decision.reports = storage.join(config.registry, name, ALIASES_DIR, config.alias, f"{stamp}-{version}")
        if promoted:
            decision.alias = {"name": name, "alias": config.alias, "version": version, "previous": current,
                              "generation": (doc or {}).get("generation", 0) + 1, "promoted_at": stamp,
                              "reports": decision.reports}
        _write_evidence(decision, candidate, champion)
        if not promoted:
            log.info("%s@%s not promoted: %s", name, version, reason)
            return decision
        if storage.write_if(alias, (json.dumps(decision.alias, indent=2) + "\n").encode(), token):
            log.info("%s@%s is the %s: %s", name, version, config.alias, reason)
            return decision
        log.info("the %s of %s moved during this promotion (attempt %d): comparing again", config.alias, name,
                 attempt + 1)
    raise RegistryError(f"{name}@{version}: the {config.alias} kept moving during {config.attempts} attempts; "
                        "nothing was changed by this promotion")


def _write_evidence(decision: Decision, candidate, champion) -> None:
    storage.write_text(storage.join(decision.reports, "candidate", "metrics.json"),
                       json.dumps(candidate.to_dict(), indent=2) + "\n")
    if champion is not None:
        storage.write_text(storage.join(decision.reports, "champion", "metrics.json"),
                           json.dumps(champion.to_dict(), indent=2) + "\n")
    storage.write_text(storage.join(decision.reports, "decision.json"), json.dumps(decision.to_dict(), indent=2) + "\n")
