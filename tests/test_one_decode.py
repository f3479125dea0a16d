"""One decode everywhere the model is fed (issue 20, item 6): ``predict`` sees a phone photo as the job does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mlbatch.core import images
from mlbatch.label import LabelConfig, label
from mlbatch.model.loaded import load_model
from mlbatch.review.views import query

ORIENTATION = 0x0112


def test_predict_applies_exif_orientation_exactly_as_the_job_does(ray_cluster, small_dataset, small_model, tmp_path):
    rows = pq.read_table(small_dataset["test"]).slice(0, 4).to_pylist()
    uris = []
    for i, row in enumerate(rows):
        shown = Image.open(row["image_uri"]).convert("RGB")
        stored = shown.rotate(90, expand=True)       # stored a quarter turn off, as a phone stores a portrait
        exif = Image.Exif()
        exif[ORIENTATION] = 6                         # "rotate 90 clockwise to display": displayed == shown
        path = tmp_path / f"phone-{i}.jpg"
        stored.save(path, quality=95, exif=exif)
        uris.append(str(path))
    manifest = str(tmp_path / "phone.parquet")
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(uris))], "image_uri": uris}), manifest)
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, batch_size=8, concurrency=1,
                      engine="ray", progress=False))
    model = load_model(small_model)
    cols = ", ".join(f"prob_{x}" for x in model.labels)
    by_job = np.array([list(r.values()) for r in query(out, f"SELECT {cols} FROM labels ORDER BY id").to_pylist()])
    by_predict = model.predict([Image.open(u) for u in uris])
    np.testing.assert_allclose(by_predict, by_job, atol=1e-5)
    # and both see the picture as displayed, not as stored
    # pixels only (no EXIF left), decoded at the scale the job decodes them (images.draft)
    stored = [np.asarray(images.draft(Image.open(u), model.spec.image_size).convert("RGB")) for u in uris]
    displayed = [Image.fromarray(np.rot90(p, k=-1).copy()) for p in stored]  # a quarter turn clockwise
    np.testing.assert_allclose(by_predict, model.predict(displayed), atol=1e-5)
    as_stored = model.predict([Image.fromarray(p) for p in stored])
    assert np.abs(as_stored - by_predict).max() > 1e-3     # the orientation matters to this model
