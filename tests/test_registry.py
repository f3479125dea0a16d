"""The model registry: references, the promotion rule, bad input, the promotion race, and runs on an alias."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from mlbatch import registry
from mlbatch.registry import promotion
from mlbatch.core import storage, versioned
from mlbatch.cli import main
from mlbatch.label import LabelConfig, label
from mlbatch.core.manifest import ManifestError
from mlbatch.nightly import NightlyConfig, nightly
from mlbatch.model import refs
from mlbatch.model.package import read_package
from reviewdata import changed_copy

NAME = "mlbatch-multilabel"   # the session model's name (TrainConfig's default)


@pytest.fixture(scope="module")
def versions(small_model, tmp_path_factory) -> dict[str, str]:
    """Three packages of one network: good (the session model), nudged (its twin), broken (predicts nothing)."""
    base = tmp_path_factory.mktemp("versions")
    return {"good": small_model, "nudged": changed_copy(small_model, str(base / "nudged"), 1e-4),
            "broken": changed_copy(small_model, str(base / "broken"), -20.0)}


def _register(reg: str, versions: dict[str, str], *which: str) -> dict[str, str]:
    return {w: registry.register(versions[w], reg)["version"] for w in which}


def _alias(reg: str) -> dict:
    doc, _ = registry.read_alias(reg, NAME)
    return doc


def _tree(root: str) -> dict[str, int]:
    return {e.uri: e.size for e in storage.list_files(root)} if storage.exists(root) else {}


def test_register_and_resolve(versions, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good")["good"]
    assert registry.register(versions["good"], reg)["created"] is False           # again: nothing changes
    assert registry.resolve(f"{reg}/{NAME}@{v}") == registry.version_uri(reg, NAME, v)
    assert read_package(registry.resolve(f"{reg}/{NAME}@{v}"))[0]["version"] == v                   # wherever a model URI goes
    assert registry.resolve(versions["good"]) == versions["good"]                  # a folder is itself
    with pytest.raises(registry.RegistryError, match=f"has no champion yet \\(versions: {v}\\)"):
        registry.resolve(f"{reg}/{NAME}@champion")
    with pytest.raises(registry.RegistryError, match=f"has no version 'abc' \\(versions: {v}\\)"):
        registry.resolve(f"{reg}/{NAME}@abc")
    assert main(["evaluate", "--model", f"{reg}/street@champion", "--manifest", "x.parquet"]) == 2
    assert f"the registry {reg} has no model 'street'" in capsys.readouterr().err
    assert main(["models", "resolve", f"{reg}/{NAME}@{v}"]) == 0
    assert capsys.readouterr().out.strip() == f"{registry.version_uri(reg, NAME, v)}  {NAME} {v}"


def test_a_registered_version_cut_in_half_is_written_again_not_called_registered(versions, tmp_path, caplog):
    """Issue 38, item 6: the description used to be written in place; a torn one left a version that did not
    read while ``register`` said "already registered"."""
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good")["good"]
    meta = os.path.join(registry.version_uri(reg, NAME, v), "mlbatch-model.json")
    text = open(meta).read()
    with open(meta, "w") as f:
        f.write(text[: len(text) // 2])
    with caplog.at_level("WARNING", logger="mlbatch.registry.store"):
        again = registry.register(versions["good"], reg)
    assert again["created"] is True and "does not read back as this package" in caplog.text
    assert open(meta).read() == text and read_package(registry.resolve(f"{reg}/{NAME}@{v}"))[0]["version"] == v
    assert not [n for n in os.listdir(os.path.dirname(meta)) if n.startswith(".")]   # no temporary file left


def test_a_cut_champion_alias_is_refused_by_name_by_resolve_and_by_promote(versions, small_dataset, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good")["good"]
    alias = refs.alias_uri(reg, NAME, "champion")
    storage.write_bytes(alias, b'{"version": "' + v.encode())                # cut, or made by something else
    message = f"{alias} is not an alias document (cut, or made by something else)"
    with pytest.raises(registry.RegistryError, match=re.escape(message)):
        registry.resolve(f"{reg}/{NAME}@champion")
    assert main(["models", "promote", f"{NAME}@{v}", "--registry", reg, "--eval", small_dataset["test"]]) == 2
    assert message in capsys.readouterr().err
    storage.delete(alias)                                                     # as the message says
    assert main(["models", "promote", f"{NAME}@{v}", "--registry", reg, "--eval", small_dataset["test"]]) == 0
    assert _alias(reg)["version"] == v


def test_promotion_rule_better_promoted_damaged_refused(versions, small_dataset, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good", "broken")
    first = registry.promote(registry.PromoteConfig(f"{NAME}@{v['broken']}", reg, [small_dataset["test"]]))
    assert first.promoted and first.reason == "no champion yet" and first.champion is None
    assert main(["models", "promote", f"{NAME}@{v['good']}", "--registry", reg, "--eval", small_dataset["test"]]) == 0
    assert capsys.readouterr().out.startswith("promoted: macro_f1")
    assert _alias(reg)["version"] == v["good"] and _alias(reg)["previous"] == v["broken"]
    # the damaged one again, now against the good champion: refused, alias unchanged, evidence written
    assert main(["models", "promote", f"{NAME}@{v['broken']}", "--registry", reg, "--eval", small_dataset["test"]]) == 3
    out = capsys.readouterr().out
    assert out.startswith("not promoted: label ") and "F1 fell by" in out
    alias = _alias(reg)
    assert (alias["version"], alias["generation"]) == (v["good"], 2)
    decisions = [json.loads(storage.read_text(e.uri)) for e in storage.list_files(f"{reg}/{NAME}/aliases/champion")
                 if e.uri.endswith("decision.json")]
    assert sorted((d["candidate"], d["promoted"]) for d in decisions) == sorted(
        [(v["broken"], True), (v["good"], True), (v["broken"], False)])
    refused = next(d for d in decisions if not d["promoted"])
    assert refused["champion"] == v["good"] and refused["candidate_score"] < refused["champion_score"]
    for side in ("candidate", "champion"):   # both reports next to the alias
        report = json.loads(storage.read_text(storage.join(refused["reports"], side, "metrics.json")))
        assert report["rows"] == 60 and [m["label"] for m in report["per_label"]] == ["car", "bus", "pedestrian"]
    # the same version again: nothing to do
    assert registry.promote(registry.PromoteConfig(f"{NAME}@{v['good']}", reg, [small_dataset["test"]])).reason == \
        f"{v['good']} is already the champion"


def test_bad_input_changes_nothing(versions, small_dataset, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good")["good"]
    partial = str(tmp_path / "partial.parquet")
    table = pq.read_table(small_dataset["test"]).drop_columns(["bus", "pedestrian"])
    pq.write_table(table, partial)
    before = _tree(reg)
    with pytest.raises(ManifestError, match=r"missing label columns \['bus', 'pedestrian'\]"):
        registry.promote(registry.PromoteConfig(f"{NAME}@{v}", reg, [partial]))
    assert main(["models", "promote", f"{NAME}@nope", "--registry", reg, "--eval", small_dataset["test"]]) == 2
    assert f"has no version 'nope' (versions: {v})" in capsys.readouterr().err
    assert main(["models", "promote", f"street@{v}", "--registry", reg, "--eval", small_dataset["test"]]) == 2
    assert "has no model 'street'" in capsys.readouterr().err
    assert main(["models", "promote", f"{NAME}@{v}", "--registry", str(tmp_path / "empty"),
                 "--eval", small_dataset["test"]]) == 2
    assert _tree(reg) == before and not os.path.exists(tmp_path / "empty")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_if_is_a_compare_and_swap(where, tmp_path, request):
    root = request.getfixturevalue("bucket") if where == "s3" else str(tmp_path)
    uri = storage.join(root, "alias.json")
    barrier = threading.Barrier(6)

    def create(i: int) -> bool:
        barrier.wait(timeout=60)
        return versioned.write_if(uri, f"writer {i}".encode(), None)

    with ThreadPoolExecutor(6) as pool:   # a writer that raised fails the test here, not silently
        won = list(pool.map(create, range(6)))
    assert sorted(won) == [False] * 5 + [True]    # every loser was told so, none raised
    wins = [i for i, w in enumerate(won) if w]
    data, token = versioned.read_versioned(uri)
    assert data == f"writer {wins[0]}".encode()
    assert versioned.write_if(uri, b"next", token) is True
    assert versioned.write_if(uri, b"stale", token) is False          # the token named the version just replaced
    assert versioned.read_versioned(uri)[0] == b"next"


def _race(monkeypatch, reg: str, versions: dict[str, str], racers: tuple[str, ...],
          manifests: list[str]) -> dict[str, registry.Decision]:
    """Promote ``racers`` at once, each reading the alias before any of them writes (they meet at a barrier
    after their first read): a real race for the swap. A promotion that raised fails the test here."""
    barrier = threading.Barrier(len(racers))
    first_read = threading.local()
    read_alias = registry.read_alias

    def racing_read(*args, **kwargs):
        result = read_alias(*args, **kwargs)
        if not getattr(first_read, "done", False):
            first_read.done = True
            barrier.wait(timeout=60)
        return result

    def run(which: str) -> registry.Decision:
        return registry.promote(registry.PromoteConfig(f"{NAME}@{versions[which]}", reg, manifests))

    monkeypatch.setattr(promotion, "read_alias", racing_read)
    try:
        with ThreadPoolExecutor(len(racers)) as pool:
            return dict(zip(racers, pool.map(run, racers)))
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_promotions_at_once_leave_one_champion(where, versions, small_dataset, tmp_path, request, monkeypatch):
    reg = storage.join(request.getfixturevalue("bucket"), "reg") if where == "s3" else str(tmp_path / "reg")
    v = _register(reg, versions, "broken", "good", "nudged")
    registry.promote(registry.PromoteConfig(f"{NAME}@{v['broken']}", reg, [small_dataset["test"]]))
    # Both promotions read the alias (champion: broken) before either writes: a real race for the swap.
    decisions = _race(monkeypatch, reg, v, ("good", "nudged"), [small_dataset["test"]])
    alias = _alias(reg)
    # Exactly one promotion won the swap against the broken champion. The other lost it, compared itself with
    # that one, and was promoted over it only if it beat it (then the alias is two generations on, and holds it).
    promoted_over_broken = [w for w, d in decisions.items() if d.promoted and d.champion == v["broken"]]
    assert len(promoted_over_broken) == 1
    first = promoted_over_broken[0]
    other = "nudged" if first == "good" else "good"
    assert decisions[other].champion == v[first] or (decisions[other].champion == v["broken"]
                                                      and not decisions[other].promoted)
    assert alias["version"] == (v[other] if decisions[other].promoted else v[first])
    assert alias["generation"] == 2 + decisions[other].promoted
    assert alias["previous"] == (v[first] if decisions[other].promoted else v["broken"])


def test_label_and_nightly_run_on_the_champion(ray_cluster, versions, small_dataset, tmp_path):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "broken", "good")
    ref = f"{reg}/{NAME}@champion"
    registry.promote(registry.PromoteConfig(f"{NAME}@{v['broken']}", reg, [small_dataset["test"]]))
    out = str(tmp_path / "labels")
    summary = label(LabelConfig(manifests=[small_dataset["test"]], model=ref, output=out, batch_size=16,
                                concurrency=1, engine="ray", progress=False))
    recorded = json.loads(storage.read_text(storage.join(out, "_run.json")))["model"]
    assert recorded == summary["model"] == {"uri": ref, "resolved_uri": registry.version_uri(reg, NAME, v["broken"]),
                                            "name": NAME, "version": v["broken"]}
    table = pq.read_table(out)
    assert set(table.column("model_version").to_pylist()) == {v["broken"]}
    assert table.column("labels").to_pylist() == [[]] * 60                   # the broken model sees nothing

    assert registry.promote(registry.PromoteConfig(f"{NAME}@{v['good']}", reg, [small_dataset["test"]])).promoted
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    storage.write_bytes(str(incoming / "m.parquet"), storage.read_bytes(small_dataset["test"]))
    night = nightly(NightlyConfig(input=str(incoming), model=ref, output=str(tmp_path / "night"),
                                  date="2026-11-24", batch_size=16, concurrency=1, engine="ray", progress=False))
    assert night["model"]["version"] == v["good"] and night["model"]["uri"] == ref
    run = json.loads(storage.read_text(storage.join(str(tmp_path / "night"), "_nightly", "runs",
                                                    night["labeled"][0]["run_id"], "_run.json")))
    assert run["model"]["version"] == v["good"] and run["model"]["resolved_uri"].endswith(f"versions/{v['good']}")
    part = pq.read_table(str(tmp_path / "night" / "dt=2026-11-24"))
    assert part.num_rows == 60 and set(part.column("model_version").to_pylist()) == {v["good"]}


def _report(macro: float, f1: dict[str, float]):
    from mlbatch.train.metrics import LabelMetrics, Report

    per_label = [LabelMetrics(label, 0.5, 0, 0, value, 0, 1, 1, 0) for label, value in f1.items()]
    return Report(per_label, macro, macro, macro, 0, 0, 10)


@pytest.mark.parametrize("candidate, champion, promoted, why", [
    ((0.80, {"car": 0.8, "bus": 0.8}), (0.70, {"car": 0.7, "bus": 0.7}), True, "gain +0.1000"),
    ((0.70, {"car": 0.7, "bus": 0.7}), (0.70, {"car": 0.7, "bus": 0.7}), False, "does not beat"),
    ((0.705, {"car": 0.7, "bus": 0.71}), (0.70, {"car": 0.7, "bus": 0.7}), False, "below --min-gain 0.01"),
    ((0.80, {"car": 0.99, "bus": 0.61}), (0.70, {"car": 0.7, "bus": 0.7}), False, "'bus' F1 fell by 0.090"),
    ((0.90, {"car": 0.9}), (0.70, {"car": 0.7, "bus": 0.7}), False, "lacks the champion's label(s) bus"),
    ((float("nan"), {"car": 0.9, "bus": 0.9}), (0.70, {"car": 0.7, "bus": 0.7}), False, "does not beat"),
])
def test_the_promotion_rule(candidate, champion, promoted, why):
    config = registry.PromoteConfig("x@1", "reg", [], min_gain=0.01, max_label_drop=0.05)
    ok, reason, _ = registry.decide(_report(*candidate), _report(*champion), config)
    assert (ok, why in reason) == (promoted, True), reason


def _decisions(reg: str) -> list[dict]:
    return [json.loads(storage.read_text(e.uri)) for e in storage.list_files(f"{reg}/{NAME}/aliases/champion")
            if e.uri.endswith("decision.json")]


def _in_effect(decisions: list[dict]) -> list[dict]:
    return [d for d in decisions if d["promoted"] and not d.get("superseded", False)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_race_of_promoters_leaves_one_decision_per_generation(where, versions, small_dataset, tmp_path, request,
                                                                monkeypatch):
    reg = storage.join(request.getfixturevalue("bucket"), "reg") if where == "s3" else str(tmp_path / "reg")
    v = _register(reg, versions, "broken", "good", "nudged")
    # No champion yet: all three read the absent alias before any writes, so all three decide to promote; one
    # creates the alias, the other two lose the swap and compare themselves again with the new champion.
    results = _race(monkeypatch, reg, v, tuple(v), [small_dataset["test"]])
    alias = _alias(reg)
    decisions = _decisions(reg)
    in_effect = _in_effect(decisions)
    assert len(in_effect) == alias["generation"]                         # one decision per generation, no more
    assert len(results) == 3 and sum(d.promoted for d in results.values()) == alias["generation"]
    assert not any(d.superseded for d in results.values())              # each returned the decision that stands
    superseded = [d for d in decisions if d.get("superseded")]
    assert len(superseded) >= 2 and all(d["promoted"] for d in superseded)   # the two first losers, at least
    assert {d["alias"]["generation"] for d in in_effect} == set(range(1, alias["generation"] + 1))
    current = json.loads(storage.read_text(storage.join(alias["reports"], "decision.json")))
    assert current["promoted"] and not current["superseded"] and current["candidate"] == alias["version"]


def test_a_promotion_that_always_loses_the_swap_exits_5(versions, small_dataset, tmp_path, capsys, monkeypatch):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "broken", "good")
    registry.promote(registry.PromoteConfig(f"{NAME}@{v['broken']}", reg, [small_dataset["test"]]))
    monkeypatch.setattr(promotion.versioned, "write_if", lambda uri, data, token: False)   # someone always got there first
    capsys.readouterr()
    assert main(["models", "promote", f"{NAME}@{v['good']}", "--registry", reg, "--eval", small_dataset["test"]]) == 5
    err = capsys.readouterr().err
    assert f"{NAME}@{v['good']}: other promotions moved the champion during each of 5 attempts" in err
    assert "nothing was changed by this promotion" in err
    with pytest.raises(registry.PromotionRaceError, match="during each of 2 attempts"):
        registry.promote(registry.PromoteConfig(f"{NAME}@{v['good']}", reg, [small_dataset["test"]], attempts=2))
    monkeypatch.undo()
    alias = _alias(reg)
    assert (alias["version"], alias["generation"]) == (v["broken"], 1)
    decisions = _decisions(reg)
    lost = sorted(d["attempt"] for d in decisions if d["candidate"] == v["good"])
    assert lost == [1, 1, 2, 2, 3, 4, 5]                                  # every round marked superseded
    assert all(d["promoted"] and d["superseded"] for d in decisions if d["candidate"] == v["good"])
    assert [d["candidate"] for d in _in_effect(decisions)] == [v["broken"]]


@pytest.mark.parametrize("candidate, what", [("../x@{v}", "model name '../x'"), ("x/../x@{v}", "model name 'x/../x'"),
                                             (NAME + "@..", "version '..'")])
def test_promote_refuses_a_name_that_is_no_path_segment(candidate, what, versions, small_dataset, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    v = _register(reg, versions, "good")["good"]
    # Real packages where a NAME of ../x or x/../x leads (REGISTRY/../x/versions/V, REGISTRY/x/versions/V): unchecked,
    # promote would evaluate them and write an alias and its evidence beside them.
    for where in (tmp_path / "x", tmp_path / "reg" / "x"):
        shutil.copytree(versions["good"], where / "versions" / v)
    before = _tree(str(tmp_path))
    assert main(["models", "promote", candidate.format(v=v), "--registry", reg, "--eval", small_dataset["test"]]) == 2
    assert what in capsys.readouterr().err
    with pytest.raises(ValueError, match="it becomes a path segment"):
        registry.promote(registry.PromoteConfig(candidate.format(v=v), reg, [small_dataset["test"]]))
    assert _tree(str(tmp_path)) == before
