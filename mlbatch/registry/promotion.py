"""Promotion: the alias moves only when the candidate beats the champion on the same evaluation
manifests (``decide``), and only by a compare-and-swap of the alias object (``versioned.write_if``):
two promotions at once cannot both win against the same champion; the one that loses the swap
compares itself again with the new champion, and its first decision is rewritten as ``superseded``.
So the decisions with ``promoted`` true and ``superseded`` false are exactly the alias's generations.
A promotion that loses every swap raises ``PromotionRaceError``, having changed nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..core import storage, versioned
from ..core.names import check_segment
from ..model.refs import ALIASES_DIR, RegistryError, alias_uri, read_alias, resolve, version_uri
from ..train.evaluate import evaluate
from .config import METRICS, PromoteConfig

log = logging.getLogger(__name__)


class PromotionRaceError(RegistryError):
    """Other promotions moved the alias during every attempt of this one; this one changed nothing."""


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
    attempt: int = 1
    superseded: bool = False       # promoted by the rule, but its swap of the alias lost: it never took effect

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

    NAME, VERSION and the alias are checked as path segments before anything is read. Nothing is
    written before both evaluations succeed (a manifest lacking a label, a missing version: an
    error, nothing changed). Every decision, refused ones included, leaves its evidence under
    ``aliases/champion/<time>-<VERSION>/``, written before the swap so the alias never names a
    folder without it. If the alias moved while this one was comparing, that decision is
    rewritten with ``superseded: true`` and it compares again with the new champion, up to
    ``attempts`` times; then ``PromotionRaceError``.
    """
    name, _, version = config.candidate.partition("@")
    if not name or not version:
        raise RegistryError(f"{config.candidate!r}: expected NAME@VERSION")
    check_segment(name, "model name")
    check_segment(version, "version")
    check_segment(config.alias, "alias")
    if config.metric not in METRICS:
        raise RegistryError(f"--metric {config.metric!r}: use one of {', '.join(METRICS)}")
    resolve(f"{config.registry.rstrip('/')}/{name}@{version}")   # a version the registry lacks: refused before evaluating
    reports: dict[str, Any] = {}

    def report(v: str):
        if v not in reports:
            reports[v] = evaluate(version_uri(config.registry, name, v), config.manifests)
        return reports[v]

    candidate = report(version)
    alias = alias_uri(config.registry, name, config.alias)
    for attempt in range(1, config.attempts + 1):
        if attempt > 1:   # a random wait, so that promotions racing again do not collide again
            time.sleep(random.uniform(0, config.backoff * 2 ** (attempt - 2)))
        doc, token = read_alias(config.registry, name, config.alias)
        current = doc["version"] if doc else None
        if current == version:
            return Decision(version, current, config.metric, getattr(candidate, config.metric), None, None, {},
                            False, f"{version} is already the {config.alias}", alias=doc or {}, attempt=attempt)
        champion = report(current) if current else None
        promoted, reason, per_label = decide(candidate, champion, config)
        score = getattr(candidate, config.metric)
        best = getattr(champion, config.metric) if champion else None
        decision = Decision(version, current, config.metric, score, best, None if best is None else score - best,
                            per_label, promoted, reason, attempt=attempt)
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
        if _swap(alias, decision, token):
            log.info("%s@%s is the %s: %s", name, version, config.alias, reason)
            return decision
        _supersede(decision)
        log.info("the %s of %s moved during this promotion (attempt %d): comparing again", config.alias, name,
                 attempt)
    raise PromotionRaceError(f"{name}@{version}: other promotions moved the {config.alias} during each of "
                             f"{config.attempts} attempts; nothing was changed by this promotion (its decisions "
                             "are marked superseded); run it again")


def _swap(alias: str, decision: Decision, token: str | None) -> bool:
    """Move the alias to ``decision`` if it is still the version ``token`` names; whether it moved."""
    try:
        return versioned.write_if(alias, (json.dumps(decision.alias, indent=2) + "\n").encode(), token)
    except Exception:   # the swap failed midway: the alias itself says whether it moved
        try:
            raw, _ = versioned.read_versioned(alias)
            if raw is None or json.loads(raw).get("reports") != decision.reports:
                _supersede(decision)
        except (OSError, ValueError):   # unknown: the decision stays as it is; the first error is reported
            log.warning("cannot tell whether %s moved to %s", alias, decision.reports)
        raise


def _supersede(decision: Decision) -> None:
    decision.superseded = True
    _write_decision(decision)


def _write_decision(decision: Decision) -> None:
    """``decision.json``, written whole (a reader never sees half of a rewrite)."""
    text = json.dumps(decision.to_dict(), indent=2) + "\n"
    storage.write_atomic(storage.join(decision.reports, "decision.json"), text.encode())


def _write_evidence(decision: Decision, candidate, champion) -> None:
    storage.write_text(storage.join(decision.reports, "candidate", "metrics.json"),
                       json.dumps(candidate.to_dict(), indent=2) + "\n")
    if champion is not None:
        storage.write_text(storage.join(decision.reports, "champion", "metrics.json"),
                           json.dumps(champion.to_dict(), indent=2) + "\n")
    _write_decision(decision)
