"""Two kinds drawn from real pictures that libraries ship, for judging defaults on texture and
handwriting that nobody drew for this project (``synth.KINDS`` lists every kind).

- ``photos``: a mosaic of two to four regions, each cut from a photograph that scikit-image
  ships; the labels are the materials in view (brick, grass, gravel, coins, text, cat fur, coffee,
  moon), and some regions are photographs that are none of them (a camera man, an astronaut, a
  star field, a retina, a page, a rocket). Training and validation cut from the left 60% of each
  photograph; a shifted test split cuts from the right 40%, which no training picture showed.
- ``digits``: one to three handwritten digits (scikit-learn's 8x8 scans, 1,797 of them) in ink on
  paper with stray strokes; the labels are ``d0`` ... ``d9``. A shifted test split draws from the
  last 40% of the scans, written by hands that training never saw.

Each draw function takes a seeded generator and a size, as in ``kinds``; the ``held_out`` ones draw
the shifted test split. scikit-image is needed only for ``photos`` (``pip install 'mlbatch[photos]'``).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

MATERIALS: dict[str, str] = {   # label -> the scikit-image sample it is cut from
    "brick": "brick", "grass": "grass", "gravel": "gravel", "coins": "coins", "text": "text",
    "cat": "chelsea", "coffee": "coffee", "moon": "moon",
}
PHOTO_LABELS: tuple[str, ...] = tuple(MATERIALS)
OTHERS: tuple[str, ...] = ("camera", "astronaut", "hubble_deep_field", "retina", "page", "rocket")
MIN_AREA = 0.04          # a material covering less of the picture than this is painted over (not labeled)
TRAIN_BAND, HELD_OUT_BAND = (0.0, 0.6), (0.6, 1.0)   # which part of each photograph a split cuts from

DIGIT_LABELS: tuple[str, ...] = tuple(f"d{k}" for k in range(10))
DIGITS_SEEN = 0.6        # the first 60% of the scans for training; a shifted test split draws from the rest


@functools.lru_cache(maxsize=None)
def _photograph(name: str) -> np.ndarray:
    """One of scikit-image's sample photographs as RGB uint8 (grey ones repeated on three channels)."""
    try:
        from skimage import data
    except ImportError as e:
        raise RuntimeError("the 'photos' kind cuts scikit-image's sample photographs: "
                           "pip install 'mlbatch[photos]' (or scikit-image)") from e
    pixels = np.asarray(getattr(data, name)())
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels[..., :3]


def _cut(rng: np.random.Generator, name: str, band: tuple[float, float], width: int, height: int) -> np.ndarray:
    """A square from the horizontal ``band`` of photograph ``name``, 20-40% of its height, resized to the picture."""
    photo = _photograph(name)
    h, w = photo.shape[:2]
    x0, x1 = int(band[0] * w), int(band[1] * w)
    side = max(8, int(min(h, x1 - x0) * rng.uniform(0.2, 0.4)))
    left, top = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, h - side + 1))
    square = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(square.resize((width, height), Image.BILINEAR), np.float32)


def _regions(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """(height, width) region numbers 0..n-1: a Voronoi mosaic with weighted seeds, so sizes vary."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    seeds = rng.uniform(0, 1, (n, 2)) * (width, height)
    weights = rng.uniform(0.6, 1.4, n)
    distance = np.stack([np.hypot(xx - sx, yy - sy) * wt for (sx, sy), wt in zip(seeds, weights)])
    return distance.argmin(axis=0)


def _draw_photos(rng: np.random.Generator, width: int, height: int,
                 band: tuple[float, float]) -> tuple[Image.Image, dict[str, bool]]:
    n = int(rng.integers(2, 5))
    region = _regions(rng, n, width, height)
    out = np.zeros((height, width, 3), np.float32)
    truth = {label: False for label in PHOTO_LABELS}
    for r in range(n):
        mask = region == r
        material = PHOTO_LABELS[int(rng.integers(len(PHOTO_LABELS)))] if rng.random() < 0.75 else None
        if material is not None and mask.mean() < MIN_AREA:
            material = None   # too small to be told apart: a photograph that is no label instead
        name = MATERIALS[material] if material else OTHERS[int(rng.integers(len(OTHERS)))]
        out[mask] = _cut(rng, name, band, width, height)[mask] * rng.uniform(0.85, 1.15)
        if material:
            truth[material] = True
    out += rng.normal(0, rng.uniform(1.0, 4.0), out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), truth


def draw_photos(rng: np.random.Generator, width: int = 64, height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """A mosaic of photograph regions cut from the left 60% of each photograph."""
    return _draw_photos(rng, width, height, TRAIN_BAND)


def draw_photos_held_out(rng: np.random.Generator, width: int = 64,
                         height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """The same mosaics cut from the right 40% of each photograph, which training never sees."""
    return _draw_photos(rng, width, height, HELD_OUT_BAND)


@functools.lru_cache(maxsize=None)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target


def _draw_digits(rng: np.random.Generator, width: int, height: int,
                 pool: slice) -> tuple[Image.Image, dict[str, bool]]:
    scans, targets = _scans()
    scans, targets = scans[pool], targets[pool]
    paper = np.array([rng.uniform(200, 250)] * 3) + rng.uniform(-12, 12, 3)
    out = np.ones((height, width, 3), np.float32) * paper
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):   # stray pen strokes that are no digit
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        d.line([(x, y), (x + rng.uniform(-12, 12), y + rng.uniform(-12, 12))], fill=(90, 90, 110), width=1)
    out = np.asarray(img, np.float32)
    truth = {label: False for label in DIGIT_LABELS}
    ink = np.array([rng.uniform(10, 60), rng.uniform(10, 60), rng.uniform(40, 120)], np.float32)
    cells = rng.choice(9, size=int(rng.integers(1, 4)), replace=False)
    for cell in cells:
        k = int(rng.integers(len(scans)))
        truth[f"d{targets[k]}"] = True
        side = int(min(width, height) * rng.uniform(0.26, 0.34))
        glyph = Image.fromarray((scans[k] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        alpha = np.asarray(glyph, np.float32)[..., None] / 255.0
        cx = int((cell % 3 + 0.5) * width / 3 + rng.uniform(-0.04, 0.04) * width - side / 2)
        cy = int((cell // 3 + 0.5) * height / 3 + rng.uniform(-0.04, 0.04) * height - side / 2)
        cx, cy = min(max(cx, 0), width - side), min(max(cy, 0), height - side)
        patch = out[cy:cy + side, cx:cx + side]
        out[cy:cy + side, cx:cx + side] = patch * (1 - alpha) + ink * alpha
    out += rng.normal(0, 3.0, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), truth


def _seen() -> int:
    return int(len(_scans()[1]) * DIGITS_SEEN)


def draw_digits(rng: np.random.Generator, width: int = 64, height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """One to three digits from the first 60% of the scans."""
    return _draw_digits(rng, width, height, slice(0, _seen()))


def draw_digits_held_out(rng: np.random.Generator, width: int = 64,
                         height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """One to three digits from the last 40% of the scans, which training never sees."""
    return _draw_digits(rng, width, height, slice(_seen(), None))
