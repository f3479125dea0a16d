"""Two more kinds of synthetic multi-label pictures, unlike the street scenes, for choosing
training defaults that hold on data nobody tuned for (``synth.KINDS`` lists all three).

- ``glyphs``: one to three stroke symbols on a cluttered background. Mirror pairs (a left and
  a right arrow, L and J) make a flip change the labels, as with digits, text or road signs.
- ``shapes``: one to six flat shapes; labels are colours, shape types, a striped texture and a
  count ("many" = four or more), so the network has to see colour and count, not just form.

Each draw function takes a seeded generator and a size and returns the picture and its truth.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# ---- glyphs ----------------------------------------------------------------------------------

# strokes in a unit box [-1, 1]^2, y down; each symbol is a list of polylines ("ring" is special)
_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "arrow_left": [[(0.8, 0.0), (-0.8, 0.0)], [(-0.25, -0.5), (-0.8, 0.0), (-0.25, 0.5)]],
    "arrow_right": [[(-0.8, 0.0), (0.8, 0.0)], [(0.25, -0.5), (0.8, 0.0), (0.25, 0.5)]],
    "letter_l": [[(-0.35, -0.8), (-0.35, 0.8), (0.55, 0.8)]],
    "letter_j": [[(0.35, -0.8), (0.35, 0.55), (0.1, 0.8), (-0.3, 0.8), (-0.55, 0.5)]],
    "digit_7": [[(-0.55, -0.8), (0.55, -0.8), (-0.1, 0.8)]],
    "plus": [[(-0.7, 0.0), (0.7, 0.0)], [(0.0, -0.7), (0.0, 0.7)]],
    "triangle": [[(0.0, -0.75), (0.75, 0.6), (-0.75, 0.6), (0.0, -0.75)]],
    "ring": [],
}
GLYPH_LABELS: tuple[str, ...] = tuple(_STROKES)


def _rgb(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    r, g, b = rng.integers(lo, hi, size=3)
    return int(r), int(g), int(b)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth two-colour gradient at a random angle, plus low-frequency blotches."""
    a, b = np.array(_rgb(rng, 30, 230), np.float32), np.array(_rgb(rng, 30, 230), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle) + 0.75) / 1.5
    pixels = (1 - t[..., None]) * a + t[..., None] * b
    coarse = rng.normal(0, 18, (4, 4, 3)).astype(np.float32)
    blotch = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BILINEAR)) for c in range(3)], -1)
    return np.clip(pixels + blotch, 0, 255)


def _contrasting(rng: np.random.Generator, pixels: np.ndarray) -> tuple[int, int, int]:
    """A colour far enough from the background's mean to be seen."""
    mean = pixels.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        c = np.array(_rgb(rng))
        if np.abs(c - mean).sum() > 180:
            return tuple(int(v) for v in c)
    return (0, 0, 0) if mean.sum() > 384 else (255, 255, 255)


def _polyline(d: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple, width: int) -> None:
    d.line(points, fill=colour, width=width, joint="curve")
    r = width / 2
    for x, y in (points[0], points[-1]):
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def draw_glyphs(rng: np.random.Generator, width: int = 64, height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """One to three symbols (any of ``GLYPH_LABELS``, repeats allowed) on clutter."""
    w, h = width, height
    pixels = _background(rng, w, h)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    s = min(w, h)
    # clutter: short random strokes and blobs that are none of the symbols
    for _ in range(int(rng.integers(2, 6))):
        pts = [(rng.uniform(0, w), rng.uniform(0, h))]
        for _ in range(int(rng.integers(1, 3))):
            pts.append((pts[-1][0] + rng.uniform(-0.2, 0.2) * s, pts[-1][1] + rng.uniform(-0.2, 0.2) * s))
        d.line(pts, fill=_rgb(rng), width=max(1, int(s * rng.uniform(0.01, 0.035))))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), s * rng.uniform(0.04, 0.1)
        d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=_rgb(rng))
    truth = {label: False for label in GLYPH_LABELS}
    n = int(rng.integers(1, 4))
    # place symbols in distinct cells of a 3x3 grid so that they do not cover each other
    cells = rng.choice(9, size=n, replace=False)
    for cell in cells:
        label = GLYPH_LABELS[int(rng.integers(len(GLYPH_LABELS)))]
        truth[label] = True
        half = s * rng.uniform(0.11, 0.16)
        cx = (cell % 3 + 0.5) * w / 3 + rng.uniform(-0.05, 0.05) * w
        cy = (cell // 3 + 0.5) * h / 3 + rng.uniform(-0.05, 0.05) * h
        turn = math.radians(rng.uniform(-20, 20))
        cos, sin = math.cos(turn), math.sin(turn)
        colour = _contrasting(rng, pixels)
        stroke = max(2, int(round(s * rng.uniform(0.035, 0.055))))
        if label == "ring":
            r = half * 0.8
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=stroke)
            continue
        for line in _STROKES[label]:
            pts = [(cx + half * (x * cos - y * sin), cy + half * (x * sin + y * cos)) for x, y in line]
            _polyline(d, pts, colour, stroke)
    out = np.asarray(img, np.float32) + rng.normal(0.0, rng.uniform(2.0, 6.0), (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), truth


# ---- shapes ----------------------------------------------------------------------------------

_COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210),
            "yellow": (230, 210, 40), "purple": (150, 60, 170), "white": (235, 235, 235)}
SHAPE_LABELS: tuple[str, ...] = ("red", "green", "blue", "circle", "square", "triangle", "striped", "many")
MANY = 4  # "many": at least this many shapes


def draw_shapes(rng: np.random.Generator, width: int = 64, height: int = 64) -> tuple[Image.Image, dict[str, bool]]:
    """One to six shapes in named colours, some striped, on a muted textured background."""
    w, h = width, height
    grey = rng.uniform(70, 150)
    tint = rng.uniform(-15, 15, 3)
    noise = np.stack([np.asarray(Image.fromarray(rng.normal(0, 14, (8, 8)).astype(np.float32)).resize(
        (w, h), Image.BILINEAR)) for _ in range(3)], -1)
    pixels = np.clip(grey + tint + noise, 0, 255)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    s = min(w, h)
    n = int(rng.integers(1, 7))
    truth = {label: False for label in SHAPE_LABELS}
    truth["many"] = n >= MANY
    # a 3x3 grid of cells, one shape per cell, so shapes can be counted
    for cell in rng.choice(9, size=n, replace=False):
        kind = ("circle", "square", "triangle")[int(rng.integers(3))]
        name = list(_COLOURS)[int(rng.integers(len(_COLOURS)))]
        colour = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in _COLOURS[name])
        truth[kind] = True
        if name in truth:
            truth[name] = True
        r = s * rng.uniform(0.09, 0.14)
        cx = (cell % 3 + 0.5) * w / 3 + rng.uniform(-0.04, 0.04) * w
        cy = (cell // 3 + 0.5) * h / 3 + rng.uniform(-0.04, 0.04) * h
        mask = Image.new("L", (w, h), 0)
        m = ImageDraw.Draw(mask)
        if kind == "circle":
            m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        elif kind == "square":
            turn = rng.uniform(0, math.pi / 2)
            m.polygon([(cx + r * 1.2 * math.cos(turn + k * math.pi / 2), cy + r * 1.2 * math.sin(turn + k * math.pi / 2))
                       for k in range(4)], fill=255)
        else:
            turn = rng.uniform(0, 2 * math.pi)
            m.polygon([(cx + r * 1.3 * math.cos(turn + k * 2 * math.pi / 3), cy + r * 1.3 * math.sin(turn + k * 2 * math.pi / 3))
                       for k in range(3)], fill=255)
        fill = Image.new("RGB", (w, h), colour)
        if rng.random() < 0.3:  # stripes in a darker shade of the same colour
            truth["striped"] = True
            f = ImageDraw.Draw(fill)
            period = max(3, int(s * 0.07))
            dark = tuple(int(v * 0.35) for v in colour)
            for k in range(-h, w + h, period):
                f.line([(k, 0), (k + h, h)], fill=dark, width=max(1, period // 2))
        img.paste(fill, (0, 0), mask)
    out = np.asarray(img, np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 4.0, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), truth
