"""A model package loaded to predict: the one path used by evaluation, ``predict`` and the labeling job."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from ..core import images
from . import calibration
from .net import MultiLabelNet
from .package import PackageError, read_package
from .refs import resolve
from .spec import resolve_precision, spec_from_meta

log = logging.getLogger(__name__)


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class LoadedModel:
    """A model package ready to predict: the one path used by evaluation and the labeling job."""

    def __init__(self, meta: dict[str, Any], net: MultiLabelNet, device: str = "cpu", precision: str = "auto"):
        self.meta = meta
        self.net = net.to(device).eval()
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.spec = net.spec
        ab = calibration.coefficients(meta.get("calibration"), self.labels)
        self._calibration = None if ab is None else tuple(torch.from_numpy(v).to(device) for v in ab)
        # made once, on the device: rebuilt per batch they were a host-to-device copy (and a sync) each time
        self._mean_std = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                               for v in (self.spec.mean, self.spec.std))
        self._pinned: torch.Tensor | None = None     # the reused page-locked buffer pixels cross to a GPU from
        self._copied: Any = None                     # the CUDA event of its last copy
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True    # the fastest kernels for the batch shapes, chosen once each

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.meta["thresholds"])

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB picture -> the float32 (3, S, S) array the network takes."""
        return images.to_array(img, self.spec.image_size, self.spec.mean, self.spec.std)

    @torch.inference_mode()
    def predict_arrays(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed batch (n, 3, S, S) -> probabilities float32 (n, n_labels)."""
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        x = x.to(self.device, non_blocking=True)
        if self.precision in _AUTOCAST:   # mixed precision: the weights stay fp32, matmuls and convolutions do not
            with torch.autocast(self.device.split(":")[0], dtype=_AUTOCAST[self.precision]):
                logits = self.net(x)
        else:
            logits = self.net(x)
        logits = logits.float()
        if self._calibration is not None:   # the package's Platt scaling, the same for every caller
            logits = logits * self._calibration[0] + self._calibration[1]
        return torch.sigmoid(logits).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def predict_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Resized uint8 pixels (n, S, S, 3) -> probabilities float32 (n, n_labels).

        The pixels are normalised by ``to_input`` on the model's device: on a GPU the uint8 pixels are
        what crosses (a quarter of float32's bytes), copied once into a reused page-locked buffer and
        from there without blocking (not measured here: this machine has no GPU). A tensor is taken
        where it is (``jpeg`` decodes on the device); a read-only array (a view of Arrow's buffer) is
        read, never written.
        """
        if not isinstance(pixels, torch.Tensor):
            pixels = self._to_device(host_tensor(pixels))
        return self.predict_arrays(to_input(pixels.to(self.device), *self._mean_std))

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Host pixels onto the model's device: on CUDA through the reused pinned buffer (one host copy)."""
        if not self.device.startswith("cuda"):
            return host
        if self._pinned is None or len(self._pinned) < len(host) or self._pinned.shape[1:] != host.shape[1:]:
            self._pinned = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
        elif self._copied is not None:
            self._copied.synchronize()               # the last batch's copy has left the buffer
        staged = self._pinned[:len(host)]
        staged.copy_(host)
        on_device = staged.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self.device))   # this device's stream ("cuda:1" too)
        return on_device

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> probabilities float32 (n_images, n_labels), columns in ``labels`` order.

        Each goes through the job's own decode (``images.as_seen``): EXIF orientation, first frame,
        transparency over white, and JPEGs opened but not yet loaded (``Image.open(path)``) decoded
        at reduced scale; so ``predict`` and the job agree on the same files.
        """
        size = self.spec.image_size
        rgb = [images.as_seen(p, size) for p in pictures]
        if not rgb:
            return self.predict_arrays(np.zeros((0, 3, size, size), np.float32))
        return self.predict_pixels(np.stack([images.resize(p, size) for p in rgb]))


def host_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A uint8 array as a CPU tensor without a copy, even when the array is read-only (a view of an Arrow
    buffer): its readers (``to_input``, a copy to the device) never write to it."""
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def to_input(pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor,
             std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 (n, S, S, 3) on any device -> float32 (n, 3, S, S): ``images.normalise`` in torch, on that device.

    The result keeps the pixels' channels-last memory, which the network runs in, so nothing is
    copied into torch's default layout and back (``benchmarks/NOTES.md``: 16.5 -> 4.5 ms a batch of 256).
    ``mean``/``std`` already on the device, shaped (1, 3, 1, 1), are used as they are (no copy).
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - m) / s


def load_model(uri: str, device: str = "cpu", precision: str = "auto") -> LoadedModel:
    """Load a model package from a local folder, an ``s3://`` prefix or a registry reference
    (``REGISTRY/NAME@champion``). Never unpickles anything."""
    uri = resolve(uri)
    meta, weights = read_package(uri)
    net = MultiLabelNet(spec_from_meta(meta))
    try:
        net.load_state_dict(load_safetensors(weights), strict=True)
    except Exception as exc:  # safetensors' and torch's errors for foreign or mismatched bytes
        raise PackageError(f"model package {uri}: weights do not fit the described network: {exc}") from None
    return LoadedModel(meta, net, device, precision)


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, naming the torch build, its CUDA version and the NVIDIA
    driver's (None when it can). The usual cause: a torch wheel built for a newer CUDA than the driver
    serves (the default torch 2.14 wheel needs CUDA 13, driver 580 or newer)."""
    if torch.cuda.is_available():
        return None
    try:
        with open("/proc/driver/nvidia/version") as f:
            driver = f.readline().strip()
    except OSError:
        driver = "no NVIDIA driver is loaded on this node (/proc/driver/nvidia/version is absent)"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    return (f"CUDA is not usable here: torch {torch.__version__} is built for {build}; driver: {driver}. "
            "Install the torch build that matches the driver (docs/kubernetes.md#gpus), or drop --require-cuda "
            "to predict on the CPU")
