"""Training augmentations on uint8 batches, drawn from one seeded generator (``config.AUGMENTATIONS``)."""

from __future__ import annotations

import torch


def _zoom_out(x: torch.Tensor, scales: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Each picture shrunk by its scale and put at its place (0-1 of the free room) on its mean colour."""
    n, c, h, w = x.shape
    out = x.mean(dim=(2, 3), keepdim=True).expand(n, c, h, w).clone()
    for i in range(n):
        if float(scales[i]) >= 1.0:
            out[i] = x[i]
            continue
        sh, sw = max(1, round(h * float(scales[i]))), max(1, round(w * float(scales[i])))
        small = torch.nn.functional.interpolate(x[i:i + 1], size=(sh, sw), mode="bilinear", antialias=True,
                                                align_corners=False)
        dy, dx = int(float(places[i, 0]) * (h - sh + 1) * 0.999), int(float(places[i, 1]) * (w - sw + 1) * 0.999)
        out[i, :, dy:dy + sh, dx:dx + sw] = small[0]
    return out


def _blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each picture through a separable Gaussian of its own sigma (0: unchanged), edges replicated."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernels = torch.exp(-taps.square() / (2 * sigmas.clamp(min=1e-3).square().view(n, 1)))
    kernels = torch.where(sigmas.view(n, 1) > 0, kernels, (taps == 0).to(x.dtype))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)   # (n*c, 5)
    flat = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    flat = torch.nn.functional.conv2d(flat, kernels.view(n * c, 1, 1, 5), groups=n * c)
    flat = torch.nn.functional.conv2d(flat, kernels.view(n * c, 1, 5, 1), groups=n * c)
    return flat.view(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, names: tuple[str, ...]) -> torch.Tensor:
    """The augmentations ``names`` (see ``config.AUGMENTATIONS``) on a uint8 batch -> float batch, 0-255."""
    n, _, h, w = x.shape
    x = x.float()
    if "hflip" in names:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
    if "vflip" in names:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1), x.flip(2), x)
    if "shift" in names:
        pad = max(1, h // 16)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if "zoom" in names:
        scales = torch.rand(n, generator=gen) * 0.3 + 0.7
        scales = torch.where(torch.rand(n, generator=gen) < 0.5, scales, torch.ones(n))   # half the pictures
        x = _zoom_out(x, scales, torch.rand(n, 2, generator=gen))
    if "blur" in names:
        sigmas = torch.rand(n, generator=gen) * 0.7 + 0.3
        x = _blur(x, torch.where(torch.rand(n, generator=gen) < 0.5, sigmas, torch.zeros(n)))
    if "balance" in names:
        warm = (torch.rand(n, 1, 1, generator=gen) - 0.5) * 0.4
        x = x * torch.cat([1 + warm, torch.ones_like(warm), 1 - warm], dim=1).unsqueeze(-1)
    if "color" in names:
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
        x = ((x - mean) * contrast + mean) * gain
    return x.clamp(0, 255)
