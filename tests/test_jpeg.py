"""``--decode torchvision`` (mlbatch.jpeg): JPEGs decoded by torchvision on the predictor's device, PIL for the rest.

Run on the CPU device here (no GPU); on a GPU the same calls take ``device="cuda"``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mlbatch import images, jpeg
from mlbatch.synth import render_frame


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_path(data: bytes, size: int, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
    return images.resize(images.decode(data, max_pixels=max_pixels, draft_size=size), size)


def _pil_error(data: bytes, size: int, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> str:
    with pytest.raises(images.ImageError) as exc:
        _pil_path(data, size, max_pixels)
    return str(exc.value)


@pytest.mark.parametrize("size", [64, 224])
def test_plain_jpegs_decode_close_to_the_pil_path(size):
    """Full-size decode + torch's antialiased bilinear resize vs PIL's reduced-scale decode + bilinear:
    close pixels (mean under 1.5 levels of 255), not identical ones."""
    frames = [render_frame(3, i, 640, 480) for i in range(16)]
    pixels, errors = jpeg.decode_resize(frames, [None] * 16, size, "cpu")
    assert errors == [None] * 16
    assert pixels.shape == (16, size, size, 3) and pixels.dtype == torch.uint8
    expected = np.stack([_pil_path(f, size) for f in frames]).astype(int)
    diff = np.abs(pixels.numpy().astype(int) - expected)
    assert diff.mean() < 1.5, diff.mean()
    assert diff.max() > 0  # it is torchvision's decoder that ran, not PIL's


def test_what_the_device_decoder_does_not_take_goes_through_pil_and_errors_are_pils():
    scene = Image.open(io.BytesIO(render_frame(4, 0, 160, 120))).convert("RGB")
    plain = _encode(scene, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    routed = {  # decoded by PIL on the CPU: exactly the default pixels
        "png": _encode(scene, "PNG"),
        "cmyk": _encode(scene.convert("CMYK"), "JPEG", quality=95),
        "exif-rotated": _encode(scene, "JPEG", quality=90, exif=exif.tobytes()),
        "gif": _encode(scene.convert("P"), "GIF"),
    }
    broken = {  # error rows, with the same reason the PIL path gives
        "empty": b"",
        "not-an-image": b"<html>no</html>",
        "truncated-jpeg": plain[: len(plain) // 2],
    }
    names = ["plain", *routed, *broken, "not-fetched"]
    data = [plain, *routed.values(), *broken.values(), None]
    fetch_errors = [None] * (len(data) - 1) + ["object not found: s3://b/k.jpg"]
    pixels, errors = jpeg.decode_resize(data, fetch_errors, 32, "cpu")
    got = dict(zip(names, errors))
    assert got["plain"] is None and all(got[k] is None for k in routed)
    for k, d in broken.items():
        assert got[k] == _pil_error(d, 32), k
    assert got["not-fetched"] == "object not found: s3://b/k.jpg"
    assert len(pixels) == 1 + len(routed)
    for k, p in zip(["plain", *routed], pixels.numpy()):
        if k != "plain":
            np.testing.assert_array_equal(p, _pil_path(routed[k], 32), err_msg=k)

    pixels, errors = jpeg.decode_resize([plain], [None], 32, "cpu", max_pixels=10_000)  # 160x120 frame
    assert len(pixels) == 0 and errors[0] == _pil_error(plain, 32, max_pixels=10_000)
    assert errors[0].startswith("image too large: 160x120 exceeds the limit of 10000 pixels")


def test_a_failing_device_decoder_falls_back_per_image(monkeypatch):
    """The batch call fails -> one by one; an image the decoder rejects -> PIL on the CPU; never an error row."""
    frames = [render_frame(5, i, 320, 240) for i in range(4)]
    real = jpeg.decode_jpeg
    calls = []

    def flaky(data, **kw):
        calls.append(type(data).__name__)
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: batch decode failed")
        if data.numel() == len(frames[2]):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(jpeg, "decode_jpeg", flaky)
    pixels, errors = jpeg.decode_resize(frames, [None] * 4, 48, "cpu")
    assert errors == [None] * 4 and pixels.shape == (4, 48, 48, 3)
    assert calls == ["list", "Tensor", "Tensor", "Tensor", "Tensor"]
    np.testing.assert_array_equal(pixels[2].numpy(), _pil_path(frames[2], 48))  # PIL's pixels for the one rejected
    assert not np.array_equal(pixels[1].numpy(), _pil_path(frames[1], 48))  # torchvision's for the others
