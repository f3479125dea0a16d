"""Image bytes -> RGB picture -> normalised array, the one way training, evaluation and the job do it.

Decoding failures raise ``ImageError`` with a short reason that ends up in the ``error``
column of the output, so it names what is wrong in words a person can act on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb is a small file that decodes to a huge picture. 64 megapixels is
# larger than any camera frame we expect and small enough to decode safely.
DEFAULT_MAX_PIXELS = 64_000_000
# Memory one decode may take (the decoded picture, at the scale it is decoded): a 64-megapixel RGB photo
# fits; a 16-bit, float or transparent picture that would need more is an error row, not a dead worker.
MAX_DECODED_BYTES = 3 * DEFAULT_MAX_PIXELS


class ImageError(ValueError):
    """This object is not an image we can label; the message says why."""


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB picture as a person would see it.

    Applies the EXIF orientation, takes the first frame of animations, converts any mode
    (grayscale, palette, RGBA, CMYK, 16-bit) to RGB, and refuses pictures over
    ``max_pixels`` before decoding them. ``draft_size`` is the side the model will resize to:
    JPEGs then decode at a reduced scale (see ``draft``), as everywhere else the model is fed.
    """
    if not data:
        raise ImageError("empty object (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image too large: {width}x{height} exceeds the limit of {max_pixels} pixels")
            draft(img, draft_size)
            need = decoded_bytes(img)
            if need > MAX_DECODED_BYTES:
                raise ImageError(f"image too large to decode: {width}x{height} {img.mode} needs {need} bytes, over "
                                 f"the budget of {MAX_DECODED_BYTES} bytes per image")
            return as_seen(img, draft_size)
    except ImageError:
        raise
    except UnidentifiedImageError:
        fmt = _signature(data)
        if fmt:  # the magic bytes of an image format whose header Pillow could not parse
            raise ImageError(f"corrupt or truncated image: a {fmt} file whose header cannot be read") from None
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: over the limit of {max_pixels} pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        fmt = _signature(data)
        raise ImageError(f"corrupt or truncated image{f' ({fmt})' if fmt else ''}: {exc}") from None


def decoded_bytes(img: Image.Image) -> int:
    """The bytes an opened picture takes once decoded (at its draft scale)."""
    if img.mode.startswith("I;16"):
        per_pixel = 2
    elif img.mode in ("I", "F"):
        per_pixel = 4
    else:
        per_pixel = Image.getmodebands(img.mode)
    width, height = img.size
    return width * height * per_pixel


def as_seen(img: Image.Image, draft_size: int | None = None) -> Image.Image:
    """An opened picture as a person sees it, in RGB: first frame, EXIF orientation applied, any mode
    converted (transparency over white). ``decode`` and ``LoadedModel.predict`` both end here, so a
    file gives the model the same pixels whichever way it comes."""
    draft(img, draft_size)
    img.seek(0)
    img.load()
    return _to_rgb(ImageOps.exif_transpose(img))


def draft(img: Image.Image, size: int | None) -> Image.Image:
    """Let a JPEG not yet decoded decode at 1/2, 1/4 or 1/8 scale, the smallest that still has at
    least ``size`` x ``size`` pixels. libjpeg scales inside its inverse DCT, so a 640x480 frame
    for a 64-pixel model decodes 2.6x faster. Every path that feeds the model (training,
    evaluation, ``LoadedModel.predict``, the job) calls this, so one file gives the same pixels
    everywhere. Other formats and pictures already decoded are left as they are.
    """
    if size and img.format == "JPEG":
        img.draft("RGB", (size, size))
    return img


_SIGNATURES = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]


def _signature(data: bytes) -> str | None:
    """The image format that ``data``'s first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip everything to white.
        arr = np.asarray(img)
        scale = 255.0 / (float(arr.max()) or 1.0)
        out = np.empty(arr.shape, np.uint8)
        for top in range(0, arr.shape[0], 512):   # in bands: float64 for 512 rows at a time, not the whole picture
            out[top:top + 512] = (arr[top:top + 512].astype(np.float64) * scale).astype(np.uint8)
        img = Image.fromarray(out, mode="L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (bilinear): uint8 (size, size, 3). Small enough to pass between stages."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalise(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (n, S, S, 3) -> float32 (n, 3, S, S), scaled to [0, 1] then standardised per channel."""
    arr = pixels.astype(np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def to_array(img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """One picture -> float32 (3, size, size): ``resize`` then ``normalise``, exactly as the job does."""
    return normalise(resize(img, size)[None], mean, std)[0]
