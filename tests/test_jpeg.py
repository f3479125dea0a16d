"""``--decode torchvision`` (mlbatch.jpeg): JPEGs decoded by torchvision on the predictor's device, PIL for the rest.

Run on the CPU device here (no GPU); on a GPU the same calls take ``device="cuda"``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mlbatch.core import images
from mlbatch.label import jpeg
from mlbatch.label import JobError, LabelConfig, label
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


def test_grayscale_jpegs_decode_on_the_device_as_rgb():
    gray = Image.open(io.BytesIO(render_frame(6, 0, 320, 240))).convert("L")
    data = _encode(gray, "JPEG", quality=90)
    pixels, errors = jpeg.decode_resize([data], [None], 48, "cpu")
    assert errors == [None] and jpeg._device_can_decode(data, 10**8) == 320 * 240
    p = pixels[0].numpy().astype(int)
    assert (p[..., 0] == p[..., 1]).all() and (p[..., 1] == p[..., 2]).all()  # gray as RGB, as PIL converts it
    assert np.abs(p - _pil_path(data, 48).astype(int)).mean() < 1.5


def test_a_jpeg_without_its_end_marker_is_pils_to_judge_whatever_the_device_decoder_says(monkeypatch):
    """A GPU decoder may return pixels for a truncated file where PIL refuses it: such files never reach it."""
    frame = render_frame(7, 0, 320, 240)
    truncated = frame[: len(frame) * 2 // 3]
    padded = frame + b"\0" * 16  # padding after the end marker is still a whole file
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, **kw: [torch.zeros((3, 240, 320), dtype=torch.uint8)
                                                                 for _ in data] if isinstance(data, list)
                        else torch.zeros((3, 240, 320), dtype=torch.uint8))
    pixels, errors = jpeg.decode_resize([truncated, padded], [None, None], 32, "cpu")
    assert errors == [_pil_error(truncated, 32), None]
    assert errors[0].startswith("corrupt or truncated image (JPEG)")
    assert int(pixels[0].sum()) == 0  # the padded one went to the (fake) device decoder


def test_a_chunk_is_resized_in_one_call_and_a_failed_resize_falls_back_to_pil(monkeypatch):
    """Large batches decode in chunks; a chunk's same-sized pictures are resized in one call (a batched
    resize); a chunk whose resize fails (the device out of memory) is decoded by PIL instead."""
    frames = [render_frame(8, i, 320, 240) for i in range(6)]
    whole, _ = jpeg.decode_resize(frames, [None] * 6, 40, "cpu")
    real_resize, real_decode, decodes, resizes = jpeg._resize, jpeg.decode_jpeg, [], []

    def failing_resize(pictures, size):
        resizes.append(len(pictures))
        if len(resizes) == 2:  # the second chunk: as if the device ran out of memory
            raise RuntimeError("CUDA out of memory")
        return real_resize(pictures, size)

    def counting_decode(data, **kw):
        decodes.append(len(data))
        return real_decode(data, **kw)

    monkeypatch.setattr(jpeg, "CHUNK_PIXELS", 3 * 320 * 240)  # three frames at a time
    monkeypatch.setattr(jpeg, "_resize", failing_resize)
    monkeypatch.setattr(jpeg, "decode_jpeg", counting_decode)
    pixels, errors = jpeg.decode_resize(frames, [None] * 6, 40, "cpu")
    assert errors == [None] * 6 and decodes == [3, 3] and resizes == [3, 3]
    for k in (3, 4, 5):
        np.testing.assert_array_equal(pixels[k].numpy(), _pil_path(frames[k], 40))  # PIL's pixels for those
    for k in (0, 1, 2):
        np.testing.assert_array_equal(pixels[k].numpy(), whole[k].numpy())
    mixed = [render_frame(8, 0, 320, 240), render_frame(8, 1, 160, 120), render_frame(8, 2, 320, 240)]
    resizes.clear()
    monkeypatch.setattr(jpeg, "_resize", lambda pictures, size: resizes.append(len(pictures)) or real_resize(
        pictures, size))
    jpeg.decode_resize(mixed, [None] * 3, 40, "cpu")
    assert sorted(resizes) == [1, 2]   # one call per picture size


def test_what_the_device_will_not_decode_is_decoded_by_pil_in_several_threads_at_once(monkeypatch):
    """PNGs (and CMYK, rotated, truncated JPEGs) fall back to PIL in the predictor: a few at once, each waiting
    here for another to start, and with PIL's pixels and PIL's reasons, in order."""
    import threading

    pngs = [_encode(Image.open(io.BytesIO(render_frame(8, i, 64, 48))), "PNG") for i in range(4)]
    both, real = threading.Barrier(2, timeout=10), jpeg._pil

    def waiting(data, size, max_pixels):
        if data in pngs[:2]:
            both.wait()   # breaks (raises) unless the second picture is decoded while the first waits
        return real(data, size, max_pixels)

    monkeypatch.setattr(jpeg, "_pil", waiting)
    pixels, errors = jpeg.decode_resize(pngs + [b"not an image"], [None] * 5, 32, "cpu")
    assert errors[:4] == [None] * 4 and errors[4] == _pil_error(b"not an image", 32)
    for k in range(4):
        np.testing.assert_array_equal(pixels[k].numpy(), _pil_path(pngs[k], 32))


def test_an_unknown_decoder_is_refused_before_anything_is_touched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.parquet").write_bytes(b"a previous run's file")
    with pytest.raises(JobError, match=r"--decode 'nvjpeg': choose one of pil, torchvision"):
        label(LabelConfig(manifests=[str(tmp_path / "none.parquet")], model=str(tmp_path / "model"),
                          output=str(tmp_path / "out"), decode="nvjpeg"))
    assert (tmp_path / "out" / "keep.parquet").read_bytes() == b"a previous run's file"


def test_a_resize_holds_a_bounded_number_of_pixels_in_float(monkeypatch):
    """Same-sized pictures are resized together, but never more than ``RESIZE_PIXELS`` at once: the resize
    works in float32, so a whole chunk at once would hold four times its bytes on the device."""
    frames = [render_frame(8, i, 320, 240) for i in range(5)]
    whole, _ = jpeg.decode_resize(frames, [None] * 5, 40, "cpu")
    real, resizes = jpeg._resize, []
    monkeypatch.setattr(jpeg, "RESIZE_PIXELS", 2 * 320 * 240)
    monkeypatch.setattr(jpeg, "_resize", lambda pictures, size: resizes.append(len(pictures)) or real(pictures, size))
    pixels, errors = jpeg.decode_resize(frames, [None] * 5, 40, "cpu")
    assert errors == [None] * 5 and resizes == [2, 2, 1]
    np.testing.assert_array_equal(pixels.numpy(), whole.numpy())
