"""``--decode torchvision``: JPEGs decoded by torchvision on the predictor's own device, PIL as fallback.

With this option the decode stage only fetches; the predictor decodes a batch's JPEGs with
``torchvision.io.decode_jpeg`` on its device (nvJPEG when it holds a GPU, libjpeg on CPU
otherwise) and resizes them there, in one call per picture size, so a GPU node's CPUs stop
decoding. Per image, anything it will not or cannot decode goes through ``images.decode`` on the
CPU instead (a few at once, in threads: PIL releases the GIL while it decodes), the default path:
other formats, CMYK or EXIF-rotated JPEGs, pictures over ``max_pixels``, files without their
end-of-image marker (truncated: PIL names them, and a GPU decoder may not), and any JPEG the
device decoder or the resize fails on. What PIL cannot read either is an error row with PIL's
reason, as always.

Not the default pixels: the PIL path decodes JPEGs at reduced scale (``images.draft``) and then
resizes bilinearly; this decodes at full size and resizes with torch's antialiased bilinear
filter, so probabilities move slightly (NOTES measures how much). No GPU here: only the CPU
device has been run; the GPU is the same calls with ``device="cuda"``.
"""

from __future__ import annotations

import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..core import images

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs for TorchCodec's and says so on every call; the
# decoders are still there and still nvJPEG on a GPU (NOTES: moving to TorchCodec is left open)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

EXIF_ORIENTATION = 0x0112
CHUNK_PIXELS = 64_000_000  # full-size pixels decoded at once (x3 bytes on the device), then resized and freed
RESIZE_PIXELS = 16_000_000  # full-size pixels resized in one call (x12 bytes as float32)
FALLBACK_THREADS = 4       # PIL decodes of what the device will not decode, at once


def decode_resize(data: list[bytes | None], errors: list[str | None], size: int, device: str,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, list[str | None]]:
    """Encoded images (``None`` where fetching failed, its reason in ``errors``) -> uint8 pixels
    (n_ok, size, size, 3) on ``device`` for the rows that decoded, and every row's error or ``None``."""
    errors = list(errors)
    pixels: list[torch.Tensor | None] = [None] * len(data)
    chunk: list[int] = []
    chunk_pixels = 0
    for i, d in enumerate(data):
        area = _device_can_decode(d, max_pixels) if d is not None else 0
        if area:
            if chunk and chunk_pixels + area > CHUNK_PIXELS:
                _decode_chunk(data, chunk, pixels, size, device)
                chunk, chunk_pixels = [], 0
            chunk.append(i)
            chunk_pixels += area
    _decode_chunk(data, chunk, pixels, size, device)
    fallback = [i for i, d in enumerate(data) if d is not None and pixels[i] is None]
    if fallback:   # PIL releases the GIL while it decodes: a few threads, not one image after another
        with ThreadPoolExecutor(max_workers=min(FALLBACK_THREADS, len(fallback))) as pool:
            for i, (pic, error) in zip(fallback, pool.map(lambda i: _pil(data[i], size, max_pixels), fallback)):
                if pic is None:
                    errors[i] = error
                else:
                    pixels[i] = torch.from_numpy(pic).to(device)
    ok = [p for p in pixels if p is not None]
    stacked = torch.stack(ok) if ok else torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device)
    return stacked, [None if p is not None else (e or "not decoded") for p, e in zip(pixels, errors)]


def _pil(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """The default path, on the CPU: the same pixels and the same error messages as the PIL decode."""
    try:
        return images.resize(images.decode(data, max_pixels=max_pixels, draft_size=size), size).copy(), None
    except images.ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # never let one object kill the job; say what happened
        return None, f"unexpected {type(exc).__name__}: {exc}"


def _device_can_decode(data: bytes, max_pixels: int) -> int:
    """The pixel count of a whole, plain RGB or grayscale JPEG within the limits and without a rotation
    (read from its header and its last bytes), else 0: PIL decodes the rest."""
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)  # above PIL's own limit PIL refuses it
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        whole = data.rstrip(b"\0 \r\n")[-2:] == b"\xff\xd9"  # the end-of-image marker: not truncated
        plain = img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(EXIF_ORIENTATION, 1) == 1
        return width * height if whole and plain and width * height <= limit else 0
    except Exception:  # PIL's path will name what is wrong
        return 0


def _decode_chunk(data: list[bytes | None], chunk: list[int], pixels: list[torch.Tensor | None], size: int,
                  device: str) -> None:
    """Decode and resize ``chunk``'s JPEGs on ``device``: the chunk at once, one by one if that fails;
    an image that fails alone is left ``None`` for PIL."""
    if not chunk:
        return
    tensors = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in chunk]  # type: ignore[arg-type]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception as exc:
        log.debug("batch JPEG decode on %s failed (%s): decoding one by one", device, exc)
        decoded = [None] * len(chunk)
        for k, t in enumerate(tensors):
            try:
                decoded[k] = decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
            except Exception:
                pass
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, picture in enumerate(decoded):
        if picture is not None:
            by_shape.setdefault(tuple(picture.shape), []).append(k)
    for same in _resize_groups(by_shape, decoded):   # a camera's frames are resized in one call, or a few
        stacked = torch.stack([decoded[k] for k in same])  # type: ignore[misc]
        for k in same:
            decoded[k] = None   # the full-size pictures are freed as soon as they are stacked
        try:
            resized = _resize(stacked, size)
        except Exception as exc:  # e.g. out of device memory: PIL on the CPU instead
            log.debug("resizing %d images on %s failed (%s): decoding them with PIL", len(same), device, exc)
            continue
        for k, picture in zip(same, resized):
            pixels[chunk[k]] = picture


def _resize_groups(by_shape: dict[tuple[int, ...], list[int]], decoded: list[torch.Tensor | None]) -> list[list[int]]:
    """Same-sized pictures in groups of at most ``RESIZE_PIXELS``: the resize works in float32, four bytes a
    channel, so a whole chunk at once would hold four times the chunk's own memory on the device."""
    groups: list[list[int]] = []
    for same in by_shape.values():
        area = decoded[same[0]].shape[1] * decoded[same[0]].shape[2]  # type: ignore[union-attr]
        step = max(1, RESIZE_PIXELS // area)
        groups += [same[i:i + step] for i in range(0, len(same), step)]
    return groups


def _resize(pictures: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, size, size, 3) uint8, bilinear with antialiasing (as PIL's resize filters)."""
    if tuple(pictures.shape[2:]) != (size, size):
        x = F.interpolate(pictures.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        pictures = x.round_().clamp_(0, 255).to(torch.uint8)
    return pictures.permute(0, 2, 3, 1).contiguous()
