"""Hostile model packages (issue 20, items 1 and 4): nothing in a package steers a path, a constructor or memory.

Each package here is one a user might receive from someone else; each is refused with an error that
names the field, and nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mlbatch.cli import main
from mlbatch.model.net import MultiLabelNet, save_package
from mlbatch.model.package import META_FILE, WEIGHTS_FILE, PackageError, read_package
from mlbatch.model.refs import resolve
from mlbatch.model.spec import ModelSpec
from mlbatch.registry.store import register


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    uri = tmp_path_factory.mktemp("pkg") / "good"
    save_package(MultiLabelNet(ModelSpec(labels=["car", "bus"], hidden=8)), str(uri), {"car": 0.5, "bus": 0.5})
    return uri


def _copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of the package with its description changed (weights untouched)."""
    dst.mkdir(parents=True)
    (dst / WEIGHTS_FILE).write_bytes((src / WEIGHTS_FILE).read_bytes())
    meta = json.loads((src / META_FILE).read_text())
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    (dst / META_FILE).write_text(json.dumps(meta))
    return dst


def _all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_path_like_version_is_refused_and_nothing_is_written_anywhere(package, tmp_path, capsys):
    bad = _copy(package, tmp_path / "recv" / "bad", version="../../../../escaped")
    registry = tmp_path / "deep" / "a" / "b" / "registry"
    before = _all_files(tmp_path)
    assert main(["models", "register", str(bad), "--registry", str(registry)]) != 0
    err = capsys.readouterr().err
    assert "package version '../../../../escaped'" in err and "path segment" in err
    assert _all_files(tmp_path) == before and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", ".hidden", "a/b"])
def test_a_weights_file_name_that_is_a_path_is_refused(package, tmp_path, name):
    bad = _copy(package, tmp_path / "bad", weights__file=name)
    with pytest.raises(PackageError, match=r"weights\.file"):
        read_package(str(bad))
    with pytest.raises(PackageError, match=r"weights\.file"):
        register(str(bad), str(tmp_path / "registry"))
    assert not (tmp_path / "registry").exists()


def test_weights_linked_from_outside_the_package_are_refused_without_a_digest_of_them(package, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours " * 100)
    bad = _copy(package, tmp_path / "bad")
    os.remove(bad / WEIGHTS_FILE)
    os.symlink(secret, bad / WEIGHTS_FILE)
    with pytest.raises(PackageError, match="leads outside") as caught:
        read_package(str(bad))
    assert hashlib.sha256(secret.read_bytes()).hexdigest()[:8] not in str(caught.value)


def test_a_changed_weights_file_error_shows_no_digest_of_it(package, tmp_path):
    bad = _copy(package, tmp_path / "bad")
    (bad / WEIGHTS_FILE).write_bytes(b"other bytes")
    with pytest.raises(PackageError, match="does not match the sha256") as caught:
        read_package(str(bad))
    assert hashlib.sha256(b"other bytes").hexdigest()[:8] not in str(caught.value)


@pytest.mark.parametrize("change, field", [
    ({"backbone__kwargs": {"checkpoint_path": "/etc/passwd"}}, "'checkpoint_path' is not allowed"),
    ({"backbone__name": "timm:resnet18", "backbone__kwargs": {"pretrained_cfg_overlay": {"file": "/x"}}},
     "'pretrained_cfg_overlay' is not allowed"),
    ({"backbone__kwargs": {"width": 10**9}}, "backbone.kwargs.width"),
    ({"backbone__kwargs": {"width": True}}, "backbone.kwargs.width"),
    ({"backbone__kwargs": {"standardize": 3}}, "backbone.kwargs.standardize"),
    ({"backbone__name": "timm:resnet18", "backbone__kwargs": {"feature_maps": 10**6}}, "backbone.kwargs.feature_maps"),
    ({"backbone__name": "timm:../../x"}, "backbone: expected"),
    ({"input__size": 100000}, "input.size"),
    ({"input__size": "64"}, "input.size"),
    ({"input__std": [0.0, 0.1, 0.1]}, "input.std"),
    ({"thresholds__car": 7}, "thresholds"),
    ({"name": "x/../../y"}, "package name"),
])
def test_a_package_field_that_would_steer_code_or_memory_is_refused(package, tmp_path, change, field):
    bad = _copy(package, tmp_path / "bad", **change)
    with pytest.raises(PackageError, match=field.replace(".", r"\.").replace("(", r"\(")):
        read_package(str(bad))


def test_the_champion_is_what_the_alias_file_says_never_a_folder_named_like_it(package, tmp_path):
    registry = tmp_path / "registry"
    done = register(str(package), str(registry))
    spoof = registry / f"{json.loads((package / META_FILE).read_text())['name']}@champion"
    _copy(package, spoof)                       # someone made a folder named like the alias
    name = done["name"]
    from mlbatch.model.refs import RegistryError
    with pytest.raises(RegistryError, match="has no champion yet"):
        resolve(f"{registry}/{name}@champion")


def test_a_link_inside_the_registry_does_not_lead_a_write_out_of_it(package, tmp_path):
    registry, elsewhere = tmp_path / "registry", tmp_path / "elsewhere"
    name = json.loads((package / META_FILE).read_text())["name"]
    (registry / name).mkdir(parents=True)
    elsewhere.mkdir()
    os.symlink(elsewhere, registry / name / "versions")
    from mlbatch.model.refs import RegistryError
    with pytest.raises(RegistryError, match="leads outside"):
        register(str(package), str(registry))
    assert list(elsewhere.iterdir()) == []
