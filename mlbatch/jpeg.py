"""``--decode torchvision``: JPEGs decoded by torchvision on the predictor's own device, PIL as fallback.

With this option the decode stage only fetches; the predictor decodes a batch's JPEGs with
``torchvision.io.decode_jpeg`` on its device (nvJPEG when it holds a GPU, libjpeg on CPU
otherwise) and resizes them there, so a GPU node's CPUs stop decoding. Per image, anything it
will not or cannot decode goes through ``images.decode`` on the CPU instead, the default path:
other formats, CMYK or EXIF-rotated JPEGs, pictures over ``max_pixels``, and any JPEG the
device decoder fails on. What PIL cannot read either is an error row with PIL's reason, as always.

Not the default pixels: the PIL path decodes JPEGs at reduced scale (``images.draft``) and then
resizes bilinearly; this decodes at full size and resizes with torch's antialiased bilinear
filter, so probabilities move slightly (NOTES measures how much). No GPU here: only the CPU
device has been run; the GPU is the same calls with ``device="cuda"``.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from . import images

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs for TorchCodec's and says so on every call; the
# decoders are still there and still nvJPEG on a GPU (NOTES: moving to TorchCodec is left open)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

EXIF_ORIENTATION = 0x0112


def decode_resize(data: list[bytes | None], errors: list[str | None], size: int, device: str,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, list[str | None]]:
    """Encoded images (``None`` where fetching failed, its reason in ``errors``) -> uint8 pixels
    (n_ok, size, size, 3) on ``device`` for the rows that decoded, and every row's error or ``None``."""
    errors = list(errors)
    pixels: list[torch.Tensor | None] = [None] * len(data)
    on_device = [i for i, d in enumerate(data) if d is not None and _device_can_decode(d, max_pixels)]
    for i, picture in zip(on_device, _decode_on_device([data[i] for i in on_device], device)):
        if picture is not None:
            pixels[i] = _resize(picture, size)
    for i, d in enumerate(data):
        if d is None or pixels[i] is not None:
            continue
        try:  # the default path, on the CPU: same pixels and same error messages as the PIL decode
            pic = images.resize(images.decode(d, max_pixels=max_pixels, draft_size=size), size)
            pixels[i] = torch.from_numpy(pic.copy()).to(device)
        except images.ImageError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # never let one object kill the job; say what happened
            errors[i] = f"unexpected {type(exc).__name__}: {exc}"
    ok = [p for p in pixels if p is not None]
    stacked = torch.stack(ok) if ok else torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device)
    return stacked, [None if p is not None else (e or "not decoded") for p, e in zip(pixels, errors)]


def _device_can_decode(data: bytes, max_pixels: int) -> bool:
    """A plain RGB or grayscale JPEG within the pixel limit and without a rotation: the header only."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        return (img.format == "JPEG" and img.mode in ("RGB", "L") and width * height <= max_pixels
                and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # PIL's path will name what is wrong
        return False


def _decode_on_device(data: list[bytes], device: str) -> list[torch.Tensor | None]:
    """Decode JPEGs (C, H, W) on ``device``, the batch at once; one by one if the batch fails; ``None`` for each
    image the decoder rejects (PIL then decodes it on the CPU)."""
    if not data:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception as exc:
        log.debug("batch JPEG decode on %s failed (%s): decoding one by one", device, exc)
    out: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
        except Exception:
            out.append(None)
    return out


def _resize(picture: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8, bilinear with antialiasing (as PIL's resize filters)."""
    if tuple(picture.shape[1:]) != (size, size):
        x = F.interpolate(picture[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        picture = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return picture.permute(1, 2, 0).contiguous()

