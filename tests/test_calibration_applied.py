"""Calibration fitted on validation and applied identically everywhere (issue 21, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlbatch.cli import main
from mlbatch.core import images
from mlbatch.label import LabelConfig, label
from mlbatch.model import calibration
from mlbatch.model.loaded import load_model
from mlbatch.model.package import META_FILE, PackageError, read_package
from mlbatch.review.views import query
from mlbatch.train import TrainConfig, train
from mlbatch.train.evaluate import evaluate
from mlbatch.train.metrics import expected_calibration_error


def test_platt_scaling_brings_overconfident_scores_to_their_frequencies():
    rng = np.random.default_rng(0)
    truth = rng.random((4000, 2)) < 0.3
    true_p = np.where(truth, 0.7, 0.15)                                   # what the scores should say
    sharp = 1 / (1 + np.exp(-3 * calibration.logit(true_p + rng.normal(0, 0.05, truth.shape).clip(-0.1, 0.1))))
    y = truth.astype(float)
    fitted = calibration.fit(["a", "b"], y[:2000], sharp[:2000], "platt")
    after = calibration.apply(fitted, ["a", "b"], sharp[2000:])
    for j in range(2):
        before_ece = expected_calibration_error(y[2000:, j], sharp[2000:, j])
        after_ece = expected_calibration_error(y[2000:, j], after[:, j])
        assert after_ece < 0.5 * before_ece and after_ece < 0.05, (before_ece, after_ece)
    order = np.argsort(sharp[2000:, 0])
    assert (np.diff(after[order, 0]) >= -1e-7).all()                      # monotone: nothing reordered
    assert calibration.fit(["a"], np.zeros((5, 1)), np.full((5, 1), 0.2), "platt")["labels"]["a"] == {"a": 1.0,
                                                                                                        "b": 0.0}


@pytest.fixture(scope="module")
def calibrated(small_dataset, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("calibrated") / "model")
    train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]], output=out,
                      epochs=2, image_size=32, calibration="platt", progress=False, seed=1))
    return out


def test_the_package_records_its_calibration_and_its_version_says_so(calibrated):
    meta, _ = read_package(calibrated)
    assert meta["calibration"]["method"] == "platt" and set(meta["calibration"]["labels"]) == set(meta["labels"])
    assert meta["version"] != meta["weights"]["sha256"][:12]          # the same weights, other probabilities


def test_predict_evaluate_and_the_job_give_the_same_calibrated_probabilities(ray_cluster, calibrated, small_dataset,
                                                                              tmp_path):
    model = load_model(calibrated)
    rows = pq.read_table(small_dataset["test"]).slice(0, 12)
    uris = rows.column("image_uri").to_pylist()
    by_predict = model.predict([Image.open(u) for u in uris])
    import torch
    size = model.spec.image_size
    with torch.no_grad():   # the network alone, on the pixels predict feeds it
        x = torch.from_numpy(np.stack([images.to_array(images.as_seen(Image.open(u), size), size, model.spec.mean,
                                                       model.spec.std) for u in uris]))
        uncalibrated = torch.sigmoid(model.net.eval()(x)).numpy()
    np.testing.assert_allclose(by_predict, calibration.apply(model.meta["calibration"], model.labels, uncalibrated),
                               atol=1e-5)
    assert np.abs(by_predict - uncalibrated).max() > 1e-3                # calibration is applied, not vacuous
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(rows, manifest)
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=calibrated, output=out, batch_size=8, concurrency=1, engine="ray",
                      progress=False))
    cols = ", ".join(f"prob_{x}" for x in model.labels)
    by_job = np.array([list(r.values()) for r in query(out, f"SELECT {cols} FROM labels ORDER BY source_row")
                       .to_pylist()])
    np.testing.assert_allclose(by_job, by_predict, atol=1e-5)
    report = evaluate(calibrated, [manifest])
    ours = {m.label: m.average_precision for m in report.per_label}
    from sklearn.metrics import average_precision_score
    truth = rows.select(model.labels).to_pandas().to_numpy().astype(int)
    assert truth.any(axis=0).all() and not truth.all(axis=0).any()   # every label's AP is defined on these rows
    for j, x in enumerate(model.labels):
        assert ours[x] == pytest.approx(average_precision_score(truth[:, j], by_predict[:, j]), abs=1e-6)


def test_a_package_with_a_hostile_calibration_is_refused(calibrated, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads(open(f"{calibrated}/{META_FILE}").read())
    meta["calibration"]["labels"][meta["labels"][0]]["a"] = 1e9
    (bad / META_FILE).write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes(open(f"{calibrated}/model.safetensors", "rb").read())
    with pytest.raises(PackageError, match="calibration.labels"):
        read_package(str(bad))


def test_the_cli_refuses_an_unknown_calibration(small_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--manifest", small_dataset["train"], "--output", str(tmp_path / "m"), "--calibration", "magic"])
    assert caught.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
