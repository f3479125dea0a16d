"""Street scenes: sky and road, clutter that is none of the labels, and 1-3 instances of each label present."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

LABELS: tuple[str, ...] = ("car", "bus", "pedestrian")
CAMERAS: tuple[str, ...] = ("cam-north", "cam-south", "cam-east")


# -----------------------------------------------------------------------------
# small drawing helpers

def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    r, g, b = rng.integers(lo, hi, size=3)
    return int(r), int(g), int(b)


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in c)


def _vertical_gradient(top: tuple, bottom: tuple, rows: int, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(rows, 1))[:, None, None]
    band = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(band, (max(rows, 1), width, 3))


def _wheel(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 20, 22))
    h = r * 0.45
    d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=(130, 130, 135))


# -----------------------------------------------------------------------------
# the three labelled objects, standing on the ground line `base`

def _draw_car(d: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, s: float) -> None:
    """Compact body, a cabin with windows on top, two dark wheels."""
    length = s * rng.uniform(0.3, 0.42)
    body_h = length * rng.uniform(0.26, 0.32)
    r = length * rng.uniform(0.10, 0.12)
    colour = _colour(rng, 20, 240)
    body_bottom = base - r * 0.7
    body_top = body_bottom - body_h
    d.rounded_rectangle([x, body_top, x + length, body_bottom], radius=body_h * 0.3, fill=colour)
    # cabin: a trapezoid on the middle of the body, glass inside
    cab_h = length * rng.uniform(0.18, 0.24)
    a, b = x + length * rng.uniform(0.18, 0.28), x + length * rng.uniform(0.72, 0.82)
    slope = (b - a) * 0.18
    d.polygon([(a, body_top + 1), (a + slope, body_top - cab_h), (b - slope, body_top - cab_h), (b, body_top + 1)], fill=colour)
    glass = (150, 185, 210) if rng.random() < 0.7 else (60, 70, 85)
    pad = cab_h * 0.2
    mid = (a + b) / 2
    d.polygon([(a + pad, body_top), (a + slope + pad * 0.6, body_top - cab_h + pad), (mid - pad * 0.3, body_top - cab_h + pad), (mid - pad * 0.3, body_top)], fill=glass)
    d.polygon([(mid + pad * 0.3, body_top), (mid + pad * 0.3, body_top - cab_h + pad), (b - slope - pad * 0.6, body_top - cab_h + pad), (b - pad, body_top)], fill=glass)
    # lights
    lw = max(1.0, length * 0.05)
    d.rectangle([x + length - lw, body_top + body_h * 0.2, x + length, body_top + body_h * 0.45], fill=(250, 230, 140))
    d.rectangle([x, body_top + body_h * 0.2, x + lw, body_top + body_h * 0.45], fill=(200, 30, 30))
    for wx in (x + length * 0.2, x + length * 0.8):
        _wheel(d, wx, base - r, r)


def _draw_bus(d: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, length: float) -> None:
    """Long tall box with a row of windows along the top half and 2-3 wheels."""
    body_h = length * rng.uniform(0.30, 0.38)
    r = body_h * rng.uniform(0.13, 0.16)
    palette = [(235, 190, 30), (200, 40, 40), (40, 90, 190), (235, 235, 235), (40, 150, 80)]
    colour = palette[int(rng.integers(len(palette)))] if rng.random() < 0.6 else _colour(rng, 20, 240)
    bottom = base - r * 0.6
    top = bottom - body_h
    d.rounded_rectangle([x, top, x + length, bottom], radius=body_h * 0.08, fill=colour)
    if rng.random() < 0.5:  # a stripe along the side
        y = top + body_h * rng.uniform(0.55, 0.7)
        d.rectangle([x, y, x + length, y + body_h * 0.06], fill=_colour(rng, 0, 256))
    # window row
    glass = (150, 185, 210) if rng.random() < 0.7 else (50, 60, 75)
    n = int(rng.integers(5, 9))
    margin = length * 0.04
    step = (length - 2 * margin) / n
    wy0, wy1 = top + body_h * 0.12, top + body_h * rng.uniform(0.42, 0.5)
    for i in range(n):
        wx = x + margin + i * step
        d.rectangle([wx + step * 0.1, wy0, wx + step * 0.9, wy1], fill=glass)
    # door
    dx = x + length * rng.uniform(0.08, 0.2)
    d.rectangle([dx, wy0, dx + length * 0.06, bottom - 1], fill=_shade(glass, 0.8))
    wheels = (0.14, 0.8) if rng.random() < 0.5 else (0.14, 0.68, 0.84)
    for f in wheels:
        _wheel(d, x + length * f, base - r, r)


def _draw_pedestrian(d: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    """Thin upright figure: round head, torso, arms, two legs. x is the body's centre."""
    head_r = height * rng.uniform(0.08, 0.1)
    torso_w = height * rng.uniform(0.2, 0.26)
    skins = [(240, 205, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40)]
    skin = skins[int(rng.integers(len(skins)))]
    shirt, trousers = _colour(rng, 10, 245), _colour(rng, 10, 200)
    top = base - height
    neck = top + 2 * head_r
    hip = top + height * rng.uniform(0.52, 0.58)
    leg_w = max(1, int(round(torso_w * 0.38)))
    stride = height * rng.uniform(0.0, 0.12)
    d.line([(x - torso_w * 0.2, hip), (x - torso_w * 0.2 - stride, base)], fill=trousers, width=leg_w)
    d.line([(x + torso_w * 0.2, hip), (x + torso_w * 0.2 + stride, base)], fill=trousers, width=leg_w)
    d.rounded_rectangle([x - torso_w / 2, neck, x + torso_w / 2, hip + height * 0.03], radius=torso_w * 0.3, fill=shirt)
    arm_w = max(1, int(round(torso_w * 0.25)))
    swing = height * rng.uniform(0.0, 0.08)
    d.line([(x - torso_w / 2, neck + head_r * 0.4), (x - torso_w / 2 - swing, hip)], fill=shirt, width=arm_w)
    d.line([(x + torso_w / 2, neck + head_r * 0.4), (x + torso_w / 2 + swing, hip)], fill=shirt, width=arm_w)
    d.ellipse([x - head_r, top, x + head_r, top + 2 * head_r], fill=skin)
    if rng.random() < 0.4:  # hair or a hat
        d.chord([x - head_r, top, x + head_r, top + 2 * head_r], 180, 360, fill=_colour(rng, 0, 120))


# -----------------------------------------------------------------------------
# clutter: things that are none of the labels

def _draw_clutter(d: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, horizon: float, s: float) -> None:
    # buildings along the horizon, some with a grid of windows
    x = -rng.uniform(0, 0.1) * w
    while x < w and rng.random() < 0.85:
        bw = s * rng.uniform(0.15, 0.4)
        bh = h * rng.uniform(0.1, 0.4)
        colour = _colour(rng, 40, 220)
        d.rectangle([x, horizon - bh, x + bw, horizon], fill=colour)
        if rng.random() < 0.5 and bh > 0.15 * h:
            glass = _shade(colour, rng.uniform(0.4, 1.4))
            rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 4))
            for i in range(rows):
                for j in range(cols):
                    cx = x + bw * (j + 0.5) / cols
                    cy = horizon - bh + bh * (i + 0.5) / (rows + 0.5)
                    ww, wh = bw * 0.25 / cols * 2, bh * 0.12
                    d.rectangle([cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2], fill=glass)
        x += bw + s * rng.uniform(0.0, 0.2)
    # road markings: a dashed line, sometimes a crossing
    y = horizon + (h - horizon) * rng.uniform(0.3, 0.9)
    paint = (235, 235, 230) if rng.random() < 0.7 else (230, 200, 40)
    dash, gap, t = s * rng.uniform(0.08, 0.15), s * rng.uniform(0.05, 0.12), max(1.0, s * 0.015)
    x = -rng.uniform(0, dash + gap)
    while x < w:
        d.rectangle([x, y, x + dash, y + t], fill=paint)
        x += dash + gap
    if rng.random() < 0.3:
        y0 = horizon + (h - horizon) * rng.uniform(0.1, 0.6)
        sh = (h - horizon) * rng.uniform(0.1, 0.2)
        x0, sw = rng.uniform(0, w * 0.7), s * rng.uniform(0.03, 0.05)
        for i in range(int(rng.integers(4, 8))):
            d.rectangle([x0 + i * 2 * sw, y0, x0 + i * 2 * sw + sw, y0 + sh], fill=(225, 225, 225))
    # trees: a trunk under a wide canopy
    for _ in range(int(rng.integers(0, 3))):
        tx = rng.uniform(0, w)
        tb = horizon + (h - horizon) * rng.uniform(0.0, 0.3)
        th = h * rng.uniform(0.2, 0.4)
        tw = max(2.0, s * rng.uniform(0.02, 0.035))
        d.rectangle([tx - tw / 2, tb - th, tx + tw / 2, tb], fill=(int(rng.integers(70, 120)), int(rng.integers(45, 80)), 30))
        cw, ch = s * rng.uniform(0.16, 0.3), th * rng.uniform(0.5, 0.8)
        green = (int(rng.integers(20, 90)), int(rng.integers(90, 180)), int(rng.integers(20, 80)))
        d.ellipse([tx - cw / 2, tb - th - ch / 2, tx + cw / 2, tb - th + ch / 2], fill=green)
    # lamp posts: a thin pole with an arm, no head
    for _ in range(int(rng.integers(0, 2))):
        px = rng.uniform(0, w)
        pb = horizon + (h - horizon) * rng.uniform(0.0, 0.4)
        ph = h * rng.uniform(0.35, 0.55)
        pw = max(1.0, s * 0.012)
        grey = _colour(rng, 40, 120)
        d.rectangle([px, pb - ph, px + pw, pb], fill=grey)
        arm = s * rng.uniform(0.06, 0.12) * (1 if rng.random() < 0.5 else -1)
        d.rectangle([min(px, px + arm), pb - ph, max(px, px + arm), pb - ph + pw * 1.5], fill=grey)
    # random rectangles and ellipses, any colour, anywhere
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rw, rh = s * rng.uniform(0.04, 0.22), s * rng.uniform(0.04, 0.22)
        box = [cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2]
        if rng.random() < 0.5:
            d.rectangle(box, fill=_colour(rng))
        else:
            d.ellipse(box, fill=_colour(rng))


# -----------------------------------------------------------------------------
# public API

def draw_scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict[str, bool]]:
    """One RGB street scene and its truth {label: present}.

    Each label is present with probability 0.5, independently, with 1-3 instances.
    Sizes are fractions of the image, so the same code works from 128x96 to camera size.
    """
    w, h = width, height
    s = min(h, w * 0.75)  # scene scale: the height of a 4:3 frame that fits
    truth = {label: bool(rng.random() < 0.5) for label in LABELS}

    # background: sky gradient above the horizon, road/pavement gradient below
    horizon = int(h * rng.uniform(0.35, 0.5))
    sky_top = _colour(rng, 60, 200)
    sky_bottom = _shade(sky_top, rng.uniform(1.05, 1.4))
    ground = _colour(rng, 50, 150)
    ground_far = _shade(ground, rng.uniform(0.8, 1.2))
    pixels = np.concatenate(
        [_vertical_gradient(sky_top, sky_bottom, horizon, w), _vertical_gradient(ground_far, ground, h - horizon, w)]
    )[:h]
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    _draw_clutter(d, rng, w, h, horizon, s)

    # objects stand on the ground; buses first, pedestrians last, so nothing present is hidden
    lo, hi = horizon + 0.15 * h, 0.98 * h
    if truth["bus"]:
        for _ in range(int(rng.integers(1, 4))):
            length = min(s * rng.uniform(0.6, 0.85), 0.9 * w)
            x = rng.uniform(-0.15 * length, w - 0.85 * length)
            _draw_bus(d, rng, x, rng.uniform(lo, hi), length)
    if truth["car"]:
        for _ in range(int(rng.integers(1, 4))):
            x = rng.uniform(-0.05 * s, w - 0.3 * s)
            _draw_car(d, rng, x, rng.uniform(lo, hi), s)
    if truth["pedestrian"]:
        for _ in range(int(rng.integers(1, 4))):
            ped_h = h * rng.uniform(0.38, 0.6)
            x = rng.uniform(0.1 * ped_h, w - 0.1 * ped_h)
            _draw_pedestrian(d, rng, x, rng.uniform(max(lo, ped_h + 1), hi), ped_h)

    # lighting and sensor noise
    out = np.asarray(img, np.float32) * rng.uniform(0.8, 1.15)
    out += rng.normal(0.0, rng.uniform(2.0, 7.0), out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), truth
