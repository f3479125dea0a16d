"""Static checks of the Kubernetes/KubeRay deployment files in ``k8s/``.

Nothing here talks to a cluster. Every YAML document is parsed and validated:

* core Kubernetes kinds with ``kubernetes_validate`` (strict, newest bundled Kubernetes version);
* KubeRay kinds (RayCluster, RayJob, RayCronJob) with ``jsonschema`` against the CRDs found in the
  folder named by ``$MLBATCH_KUBERAY_CRDS`` (skipped when unset, failed when set but missing),
  plus a walk that rejects keys the CRD does not declare (the CRDs do not forbid unknown keys,
  so a misspelled field would otherwise pass), plus every embedded pod template validated as a
  core v1 Pod;
* every command that runs ``jobs/label_images.py``, ``jobs/nightly.py`` or ``mlbatch`` is parsed
  with the project's own argument parser, and ``ray job submit`` options with Ray's own CLI;
* no credential is written into any file; the Dockerfile builds on the installed Ray version.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from kubernetes_validate.utils import latest_version

from mlbatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
CRD_ENV = "MLBATCH_KUBERAY_CRDS"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
KUBERAY_GROUP = "ray.io"
K8S_VERSION = latest_version()  # newest Kubernetes schema kubernetes_validate bundles
EXPECTED_FILES = {
    "raycluster.yaml", "rayjob-label.yaml", "raycronjob-nightly.yaml", "cronjob-submit.yaml",
    "serviceaccount.yaml", "configmap.yaml", "Dockerfile", "README.md",
}
JOB_SCRIPTS = {"jobs/label_images.py": "label", "jobs/nightly.py": "nightly"}
IMAGE_PREFIX = "ghcr.io/example/mlbatch:"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- loading

def _load_yaml_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")])


@functools.lru_cache(maxsize=None)
def _all_docs() -> tuple[tuple[str, int, dict], ...]:
    out = []
    for path in _manifest_files():
        for i, doc in enumerate(_load_yaml_all(path.read_text())):
            out.append((path.name, i, doc))
    return tuple(out)


def _docs(kind: str | None = None, file: str | None = None) -> list[dict]:
    return [copy.deepcopy(d) for f, _, d in _all_docs()
            if (kind is None or d.get("kind") == kind) and (file is None or f == file)]


def _is_kuberay(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == KUBERAY_GROUP


def _doc_ids(kuberay: bool) -> list[pytest.param]:
    return [pytest.param(f, i, id=f"{f}#{i}-{d.get('kind')}") for f, i, d in _all_docs()
            if _is_kuberay(d) == kuberay]


def _doc(file: str, index: int) -> dict:
    return copy.deepcopy(next(d for f, i, d in _all_docs() if f == file and i == index))


def resolve_crd_dir() -> Path:
    """The CRD folder from $MLBATCH_KUBERAY_CRDS: skip when unset, fail when set but unusable."""
    value = os.environ.get(CRD_ENV)
    if not value:
        pytest.skip(f"{CRD_ENV} is not set: point it at a folder holding the KubeRay CRDs "
                    f"({', '.join(sorted(CRD_FILES.values()))}) to validate the KubeRay manifests")
    folder = Path(value)
    if not folder.is_dir():
        pytest.fail(f"{CRD_ENV}={value!r} is not a folder")
    missing = [name for name in CRD_FILES.values() if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"{CRD_ENV}={value!r} lacks {', '.join(missing)}")
    return folder


@functools.lru_cache(maxsize=None)
def _crd_versions(path: str) -> dict[str, Any]:
    """{"kind": ..., "group": ..., "versions": {name: openAPIV3Schema}} of one CRD file (cached)."""
    docs = _load_yaml_all(Path(path).read_text())
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    spec = crd["spec"]
    return {
        "kind": spec["names"]["kind"],
        "group": spec["group"],
        "versions": {v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")},
    }


def crd_schema(crd_dir: Path, doc: dict) -> dict:
    kind = doc.get("kind")
    assert kind in CRD_FILES, f"no CRD known for kind {kind!r}"
    group, _, version = str(doc.get("apiVersion", "")).partition("/")
    info = _crd_versions(str(crd_dir / CRD_FILES[kind]))
    assert info["kind"] == kind and info["group"] == group, \
        f"{CRD_FILES[kind]} defines {info['group']}/{info['kind']}, not {group}/{kind}"
    assert version in info["versions"], \
        f"{kind} apiVersion {doc.get('apiVersion')!r}: served versions are {sorted(info['versions'])}"
    return info["versions"][version]


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    return resolve_crd_dir()


# --------------------------------------------------------------------------- validators

def undeclared_fields(doc: Any, schema: dict, path: str = "") -> list[str]:
    """Paths of keys in ``doc`` that ``schema`` does not declare.

    Where a schema object lists ``properties`` and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields``, any other key is a typo (the API server would
    prune it silently). jsonschema alone does not see this because CRDs do not set
    ``additionalProperties: false``.
    """
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    if isinstance(doc, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key, value in doc.items():
            sub = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                errors += undeclared_fields(value, props[key], sub)
            elif isinstance(addl, dict):
                errors += undeclared_fields(value, addl, sub)
            elif props is not None and addl is None and not preserve:
                errors.append(sub)
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            errors += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return errors


def kuberay_errors(doc: dict, schema: dict) -> list[str]:
    """Schema violations plus undeclared keys of a KubeRay document."""
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(doc)]
    errors += [f"{p}: field not declared in the CRD schema (typo?)" for p in undeclared_fields(doc, schema)]
    return errors


def pod_templates(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every embedded pod template (a dict with spec.containers) under ``node``."""
    if isinstance(node, dict):
        spec = node.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list) and path:
            yield path, node
            return
        for key, value in node.items():
            yield from pod_templates(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from pod_templates(item, f"{path}[{i}]")


def validate_pod_template(template: dict) -> None:
    """Validate a pod template as a core v1 Pod (strict); raises kubernetes_validate.ValidationError."""
    metadata = {"name": "template-check", **(template.get("metadata") or {})}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


class CommandError(AssertionError):
    pass


def parse_mlbatch(argv: list[str]):
    """``build_parser().parse_args(argv)`` turning argparse's SystemExit into a readable failure."""
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv)
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines() or [""]
        raise CommandError(f"mlbatch parser rejects {shlex.join(argv)!r} (exit {exc.code}): {lines[-1]}") from None
    # argparse also accepts unambiguous prefixes (--max-error for --max-error-rate): a manifest
    # must spell flags out, or a future flag sharing the prefix would break it.
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[ns.command]
    known = {s for p in (parser, sub) for a in p._actions for s in a.option_strings}
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            raise CommandError(f"{flag!r} is not spelled out as a flag of `mlbatch {ns.command}` "
                               f"(argparse took it as an abbreviation): {shlex.join(argv)!r}")
    return ns


def check_ray_job_submit(options: list[str]) -> dict:
    """Parse ``ray job submit`` options (before ``--``) with Ray's own click command."""
    import click
    from ray.dashboard.modules.job.cli import submit

    try:
        ctx = submit.make_context("submit", [*options, "--", "true"], resilient_parsing=False)
    except click.exceptions.ClickException as exc:
        raise CommandError(f"`ray job submit` rejects {shlex.join(options)!r}: {exc.format_message()}") from None
    if ctx.params.get("runtime_env_json"):
        try:
            json.loads(ctx.params["runtime_env_json"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--runtime-env-json is not JSON: {exc}") from None
    return ctx.params


SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


def check_command(argv: list[str]) -> list[tuple[str, Any]]:
    """Check one command line; return [(mlbatch sub-command, parsed namespace), ...] found in it."""
    if not argv:
        return []
    if argv[0] in SHELLS and "-c" in argv:
        script = argv[argv.index("-c") + 1]
        found = []
        segment: list[str] = []
        for token in [*shlex.split(script, posix=True), ";"]:
            if token in {";", "&&", "||", "|"}:
                found += check_command(segment[1:] if segment[:1] == ["exec"] else segment)
                segment = []
            else:
                segment.append(token)
        return found
    if argv[:3] == ["ray", "job", "submit"]:
        rest = argv[3:]
        if "--" not in rest:
            raise CommandError(f"`ray job submit` without `--` before the entrypoint: {shlex.join(argv)!r}")
        cut = rest.index("--")
        check_ray_job_submit(rest[:cut])
        return check_command(rest[cut + 1:])
    if Path(argv[0]).name.startswith("python") and len(argv) > 1:
        script = argv[1].removeprefix("/app/").removeprefix("./")
        if script in JOB_SCRIPTS:
            sub = JOB_SCRIPTS[script]
            return [(sub, parse_mlbatch([sub, *argv[2:]]))]
        return []
    if Path(argv[0]).name == "mlbatch":
        ns = parse_mlbatch(argv[1:])
        return [(ns.command, ns)]
    return []


def commands_of(doc: Any) -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every container command and every RayJob entrypoint in ``doc``."""
    def walk(node: Any, path: str) -> Iterator[tuple[str, list[str]]]:
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                for i, c in enumerate(node.get(key) or []):
                    argv = [*(c.get("command") or []), *(c.get("args") or [])]
                    if argv:
                        yield f"{path}.{key}[{i}]({c.get('name')})", [str(a) for a in argv]
            if isinstance(node.get("entrypoint"), str):
                yield f"{path}.entrypoint", shlex.split(node["entrypoint"])
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}[{i}]")
    yield from walk(doc, "")


SENSITIVE_NAME = re.compile(r"^[A-Z0-9_]*(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL)[A-Z0-9_]*$")
SENSITIVE_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                    # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^\s*aws_secret_access_key\s*=\s*\S", re.M),      # ~/.aws/credentials syntax
    re.compile(r"(?<![\w$])(AWS_SECRET_ACCESS_KEY|RAY_AUTH_TOKEN)=(?![\"']?\$)[^\s\"'$]"),  # KEY=literal, not KEY=$VAR
]


def _expand(node: Any) -> Iterator[Any]:
    """``node`` plus runtime envs hidden in strings (runtimeEnvYAML, --runtime-env-json)."""
    yield node
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "runtimeEnvYAML" and isinstance(value, str):
                yield from _expand(yaml.load(value, Loader=_Loader))
            else:
                yield from _expand(value)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            if item == "--runtime-env-json" and i + 1 < len(node):
                with contextlib.suppress(ValueError):
                    yield from _expand(json.loads(node[i + 1]))
            yield from _expand(item)


def credential_leaks(doc: Any) -> list[str]:
    problems = []
    if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append("a Secret manifest with data: create Secrets with kubectl, never in a file")
    for node in _expand(doc):
        if not isinstance(node, dict):
            continue
        name = node.get("name")
        if isinstance(name, str) and SENSITIVE_NAME.match(name) and node.get("value") not in (None, ""):
            problems.append(f"env {name} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            if isinstance(key, str) and SENSITIVE_NAME.match(key) and isinstance(value, (str, int, float)) \
                    and str(value) != "":
                problems.append(f"key {key} holds a literal value")
    return problems


def text_leaks(text: str) -> list[str]:
    return [f"matches {rx.pattern!r}" for rx in SENSITIVE_TEXT if rx.search(text)]


def dockerfile_base_images(text: str) -> list[str]:
    """The FROM images of a Dockerfile, with ${ARG} replaced by the ARG defaults."""
    args: dict[str, str] = {}
    images = []
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if m := re.match(r"ARG\s+(\w+)=(\S+)", line, re.I):
            args.setdefault(m.group(1), m.group(2).strip("\"'"))
        elif m := re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.I):
            image = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            images.append(image)
    return images


def dockerfile_problems(text: str, ray_version: str) -> list[str]:
    problems = []
    images = dockerfile_base_images(text)
    if not images:
        problems.append("no FROM")
    for image in images:
        repo, _, tag = image.partition(":")
        if repo != "rayproject/ray":
            problems.append(f"FROM {image}: not a rayproject/ray image")
        elif not tag.startswith(ray_version + "-") and tag != ray_version:
            problems.append(f"FROM {image}: Ray {tag!r} but the project runs Ray {ray_version}")
    for tag in re.findall(r"rayproject/ray:(\S+)", text):
        if not re.match(re.escape(ray_version) + r"(\b|-)", tag):
            problems.append(f"mentions rayproject/ray:{tag}, not Ray {ray_version}")
    if not re.search(r"^\s*COPY\b.*\s\.\s+/app/?\s*$", text, re.M):
        problems.append("does not COPY the repository (.) to /app")
    if not re.search(r"pip install\b[^\n]*\s/app/?(\s|$)", text):
        problems.append("does not `pip install /app`")
    if not re.search(r"^\s*WORKDIR\s+/app\s*$", text, re.M):
        problems.append("WORKDIR is not /app (jobs/*.py run from there)")
    return problems


# --------------------------------------------------------------------------- the files

def test_expected_files_present():
    present = {p.name for p in K8S_DIR.iterdir()}
    assert EXPECTED_FILES <= present, f"missing in k8s/: {sorted(EXPECTED_FILES - present)}"
    assert not (K8S_DIR / "crds").exists(), "the KubeRay CRDs must not be copied into the project"


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_yaml_parses(path: Path):
    docs = _load_yaml_all(path.read_text())
    assert docs, f"{path.name}: no YAML document"
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict), f"{path.name}#{i}: not a mapping"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path.name}#{i}: no {key}"
        assert doc["metadata"].get("name"), f"{path.name}#{i}: no metadata.name"


@pytest.mark.parametrize(("file", "index"), _doc_ids(kuberay=False))
def test_core_kinds_validate(file: str, index: int):
    doc = _doc(file, index)
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{file}#{index} {doc['kind']}: {exc.message} at {'.'.join(map(str, exc.path))}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{file}#{index}: {exc}")


@pytest.mark.parametrize(("file", "index"), _doc_ids(kuberay=True))
def test_kuberay_kinds_validate(crd_dir: Path, file: str, index: int):
    doc = _doc(file, index)
    errors = kuberay_errors(doc, crd_schema(crd_dir, doc))
    assert not errors, f"{file}#{index} {doc['kind']}:\n  " + "\n  ".join(errors)
    # metadata is a bare `type: object` in the CRD: check it as core ObjectMeta
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S_VERSION, strict=True)


@pytest.mark.parametrize(("file", "index"), _doc_ids(kuberay=True))
def test_kuberay_pod_templates_are_valid_pods(file: str, index: int):
    doc = _doc(file, index)
    templates = list(pod_templates(doc["spec"]))
    assert templates, f"{file}#{index}: no pod template found"
    for path, template in templates:
        try:
            validate_pod_template(template)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file}#{index} spec.{path}: {exc.message} at {'.'.join(map(str, exc.path))}")


def _all_commands() -> list[tuple[str, str, list[str]]]:
    return [(f"{f}#{i}", where, argv) for f, i, d in _all_docs() for where, argv in commands_of(d)]


@pytest.mark.parametrize(("doc", "where", "argv"), _all_commands(),
                         ids=[f"{d}{w}" for d, w, _ in _all_commands()])
def test_commands_parse(doc: str, where: str, argv: list[str]):
    try:
        check_command(argv)
    except CommandError as exc:
        pytest.fail(f"{doc} {where}: {exc}")


def test_each_job_manifest_runs_the_expected_command():
    found: dict[str, set[str]] = {}
    for f, _, doc in _all_docs():
        for _, argv in commands_of(doc):
            found.setdefault(f, set()).update(sub for sub, _ in check_command(argv))
    assert found.get("rayjob-label.yaml") == {"label"}, found
    assert found.get("raycronjob-nightly.yaml") == {"nightly"}, found
    assert found.get("cronjob-submit.yaml") == {"nightly"}, found


def test_job_scripts_exist():
    referenced = {s for _, _, argv in _all_commands() for s in argv if s.removeprefix("/app/") in JOB_SCRIPTS}
    missing = [s for s in sorted(referenced) if not (ROOT / s.removeprefix("/app/")).is_file()]
    assert referenced, "no manifest runs a job script"
    assert not missing, f"manifests run job scripts that are not in the repository: {', '.join(missing)}"


@pytest.mark.parametrize("path", [p for p in sorted(K8S_DIR.iterdir()) if p.is_file()], ids=lambda p: p.name)
def test_no_literal_credentials(path: Path):
    text = path.read_text()
    problems = text_leaks(text)
    if path.suffix in {".yaml", ".yml"}:
        for i, doc in enumerate(_load_yaml_all(text)):
            problems += [f"#{i}: {p}" for p in credential_leaks(doc)]
    if path.name == "Dockerfile":
        problems += [f"{m.group(0)!r}: secret in an image layer" for m in
                     re.finditer(r"^\s*(?:ENV|ARG)\s+(\w+)[= ]\S+", text, re.M) if SENSITIVE_NAME.match(m.group(1))]
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_dockerfile_matches_installed_ray():
    problems = dockerfile_problems((K8S_DIR / "Dockerfile").read_text(), ray.__version__)
    assert not problems, "k8s/Dockerfile: " + "; ".join(problems)


# --------------------------------------------------------------------------- cross-file policy

def _ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for f, _, doc in _all_docs():
        spec = doc.get("spec", {})
        if doc.get("kind") == "RayCluster":
            out.append((f, spec))
        elif doc.get("kind") == "RayJob":
            out.append((f, spec.get("rayClusterSpec", {})))
        elif doc.get("kind") == "RayCronJob":
            out.append((f, spec.get("jobTemplate", {}).get("rayClusterSpec", {})))
    return out


def test_ray_clusters_follow_the_design():
    specs = _ray_cluster_specs()
    assert {f for f, _ in specs} == {"raycluster.yaml", "rayjob-label.yaml", "raycronjob-nightly.yaml"}
    for f, spec in specs:
        assert spec.get("rayVersion") == ray.__version__, f"{f}: rayVersion != installed Ray {ray.__version__}"
        assert spec.get("enableInTreeAutoscaling") is True, f
        assert spec.get("authOptions", {}).get("mode") == "token", f"{f}: Ray token auth is off"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{f}: head must not run tasks"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups.get("gpu")
        assert gpu and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, f"{f}: autoscaling gpu group"
        container = gpu["template"]["spec"]["containers"][0]
        assert str(container["resources"]["limits"].get("nvidia.com/gpu")) == "1", f
        assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations", [])), f
        assert "cpu" in groups, f"{f}: no CPU worker group"
        images = {c["image"] for _, t in pod_templates(spec) for c in t["spec"]["containers"]}
        assert len(images) == 1, f"{f}: one Ray cluster must use one image, found {images}"
        assert all(i.startswith(IMAGE_PREFIX) for i in images), images
        for _, template in pod_templates(spec):
            assert template["spec"].get("serviceAccountName") == "mlbatch", f
            env = {e["name"]: e for c in template["spec"]["containers"] for e in c.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "mlbatch-s3" and ref.get("optional") is True, (f, name)
            for name in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
                assert env[name]["valueFrom"]["configMapKeyRef"]["name"] == "mlbatch-config", (f, name)


def test_submit_cronjob_targets_the_long_lived_cluster_with_its_token():
    cluster = _docs("RayCluster", "raycluster.yaml")[0]
    cron = _docs("CronJob", "cronjob-submit.yaml")[0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:3] == ["ray", "job", "submit"]
    params = check_ray_job_submit(argv[3:argv.index("--")])
    assert params["address"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert params["working_dir"] == "/app"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"].get("value") == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == cluster["spec"]["authOptions"]["secretName"] and ref["key"] == "auth_token"
    assert container["image"].startswith(IMAGE_PREFIX)


def test_rayjobs_clean_up_after_themselves():
    jobs = [("rayjob-label.yaml", _docs("RayJob")[0]["spec"]),
            ("raycronjob-nightly.yaml", _docs("RayCronJob")[0]["spec"]["jobTemplate"])]
    for f, spec in jobs:
        assert spec.get("shutdownAfterJobFinishes") is True, f
        assert spec.get("ttlSecondsAfterFinished", -1) >= 0, f
        assert spec.get("activeDeadlineSeconds", 0) > 0, f
        assert yaml.safe_load(spec["runtimeEnvYAML"]).get("working_dir") == "/app", f
    cron = _docs("RayCronJob")[0]["spec"]
    assert cron["schedule"].split()[:2] == ["0", "2"]
    # no concurrencyPolicy in the RayCronJob CRD: runs must end well before the next one starts
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


# --------------------------------------------------------------------------- the validators can fail

def test_crd_folder_env_handling(monkeypatch, tmp_path):
    monkeypatch.delenv(CRD_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=CRD_ENV):
        resolve_crd_dir()
    monkeypatch.setenv(CRD_ENV, str(tmp_path / "absent"))
    with pytest.raises(pytest.fail.Exception, match="not a folder"):
        resolve_crd_dir()
    (tmp_path / CRD_FILES["RayJob"]).write_text("")
    monkeypatch.setenv(CRD_ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="lacks"):
        resolve_crd_dir()


def test_misspelled_kuberay_fields_are_rejected(crd_dir: Path):
    cluster = _docs("RayCluster", "raycluster.yaml")[0]
    schema = crd_schema(crd_dir, cluster)
    assert not kuberay_errors(cluster, schema)

    bad = copy.deepcopy(cluster)
    group = bad["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")                 # top-level CRD field
    assert any("minReplica:" in e for e in kuberay_errors(bad, schema))

    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mod"] = bad["spec"]["authOptions"].pop("mode")
    assert any("authOptions.mod:" in e for e in kuberay_errors(bad, schema))

    bad = copy.deepcopy(cluster)
    container = bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")  # deep inside the pod template
    assert any("imagePulPolicy" in e for e in kuberay_errors(bad, schema))
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        validate_pod_template(bad["spec"]["headGroupSpec"]["template"])

    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"     # wrong type
    assert any("maxReplicas" in e for e in kuberay_errors(bad, schema))

    cron = _docs("RayCronJob")[0]
    bad = copy.deepcopy(cron)
    bad["spec"]["concurrencyPolicy"] = "Forbid"                     # not in the RayCronJob CRD
    assert any("spec.concurrencyPolicy" in e for e in kuberay_errors(bad, crd_schema(crd_dir, bad)))


def test_misspelled_core_fields_are_rejected():
    cron = _docs("CronJob", "cronjob-submit.yaml")[0]
    cron["spec"]["concurencyPolicy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="concurencyPolicy"):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_bad_commands_are_rejected():
    job = _docs("RayJob")[0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert check_command(argv)[0][0] == "label"
    with pytest.raises(CommandError, match="--bogus-flag"):
        check_command([*argv, "--bogus-flag", "1"])
    without_model = [a for i, a in enumerate(argv) if a != "--model" and argv[i - 1] != "--model"]
    with pytest.raises(CommandError, match="--model"):
        check_command(without_model)
    with pytest.raises(CommandError, match="abbreviation"):
        check_command([*argv, "--max-error", "0.1"])
    with pytest.raises(CommandError, match="--concurrency"):
        check_command(["python", "jobs/nightly.py", "--input", "s3://b/i", "--model", "s3://b/m",
                       "--output", "s3://b/o", "--concurrency", "8,2"])
    with pytest.raises(CommandError, match="--adress"):
        check_command(["ray", "job", "submit", "--adress", "http://x:8265", "--", *argv])
    with pytest.raises(CommandError, match="bogus"):
        check_command(["bash", "-c", f"exec ray job submit -- {shlex.join(argv)} --bogus"])
    with pytest.raises(CommandError, match="runtime-env-json"):
        check_command(["ray", "job", "submit", "--runtime-env-json", "{not json", "--", *argv])


def test_literal_credentials_are_detected():
    cluster = _docs("RayCluster", "raycluster.yaml")[0]
    assert not credential_leaks(cluster)
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"})
    assert credential_leaks(bad)
    job = _docs("RayJob")[0]
    job["spec"]["runtimeEnvYAML"] = "env_vars:\n  RAY_AUTH_TOKEN: abc\n"
    assert credential_leaks(job)
    assert credential_leaks({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                             "stringData": {"x": "y"}})
    assert text_leaks("--from-literal=AWS_SECRET_ACCESS_KEY=abc123")
    assert not text_leaks('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
    assert text_leaks("key AKIA" + "ABCDEFGHIJKLMNOP")
    assert text_leaks("[default]\naws_secret_access_key = abc123\n")


def test_dockerfile_check_can_fail():
    good = (K8S_DIR / "Dockerfile").read_text()
    assert not dockerfile_problems(good, ray.__version__)
    assert dockerfile_problems(good, "9.9.9")
    assert dockerfile_problems("FROM python:3.11\nWORKDIR /app\nCOPY . /app\nRUN pip install /app\n",
                               ray.__version__)
    assert dockerfile_problems(good.replace("pip install --no-cache-dir /app", "true"), ray.__version__)


def test_the_submit_cronjobs_deadline_stops_the_ray_job_not_only_its_client():
    """activeDeadlineSeconds terminates the pod; its preStop hook stops the Ray job it submitted, by the id it
    submitted under (the pod's name), so no night outlives its deadline on the cluster."""
    cron = _docs("CronJob", "cronjob-submit.yaml")[0]["spec"]["jobTemplate"]["spec"]
    assert cron["activeDeadlineSeconds"] < 24 * 3600
    pod = cron["template"]["spec"]
    container = pod["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    params = check_ray_job_submit(argv[3:argv.index("--")])
    assert params["submission_id"] == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["/bin/sh", "-c"]
    stop = shlex.split(hook[2])
    assert stop[:3] == ["ray", "job", "stop"] and stop[-1] == "$POD_NAME"
    assert stop[stop.index("--address") + 1] == params["address"]
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_the_shipped_jobs_ask_for_gpus_and_require_cuda():
    """The head has no CPUs for work and the gpu group starts at zero: a job that plans by what the cluster has
    would ask for no GPU, and the autoscaler would never add one (every night on CPU, silently)."""
    jobs = [*_docs("RayJob"), *_docs("RayCronJob")]
    assert len(jobs) == 2
    for doc in jobs:
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        argv = shlex.split(spec["entrypoint"])
        assert float(argv[argv.index("--num-gpus") + 1]) >= 1 and "--require-cuda" in argv
        assert check_command(argv)[0][0] in ("label", "nightly")      # both flags are the CLI's own
        cluster = spec["rayClusterSpec"]
        gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert cluster["enableInTreeAutoscaling"] and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
