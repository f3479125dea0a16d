"""Channels-last against contiguous memory for the network: training steps and predictions per second.

    python -m benchmarks.memory_format [--backbones cnn-small,resnet-mini] [--threads 1 2] [--out FILE]

``MultiLabelNet`` keeps its weights and the pictures it is given in channels-last memory (NHWC). This
measures what that buys against the contiguous layout (NCHW) torch uses otherwise, on the same
weights and the same random pictures: training steps (forward, backward, AdamW, batch 64, as
``mlbatch train``) and inference (batch 256, as the labeling job), at the default input size. The
two layouts give the same values to float rounding; the figure is speed only.
"""

from __future__ import annotations

import argparse
import time

import torch

from mlbatch.model.net import MultiLabelNet
from mlbatch.model.spec import ModelSpec

from . import emit


def _contiguous(net: MultiLabelNet):
    """The network as torch lays it out by default: NCHW weights, NCHW pictures."""
    net.to(memory_format=torch.contiguous_format)
    return lambda x: net.classify(net.backbone(x.contiguous()))


def _rate(step, x: torch.Tensor, seconds: float) -> float:
    for _ in range(3):
        step(x)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step(x)
        done += len(x)
    return done / (time.perf_counter() - started)


def measure(backbone: str, layout: str, threads: int, size: int = 64, seconds: float = 5.0) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = MultiLabelNet(ModelSpec(labels=[f"l{i}" for i in range(8)], backbone=backbone, image_size=size))
    forward = net if layout == "channels_last" else _contiguous(net)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    y = torch.zeros(64, 8)

    def train_step(x: torch.Tensor) -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    train_rate = _rate(train_step, torch.rand(64, 3, size, size), seconds)
    net.eval()
    with torch.inference_mode():
        predict_rate = _rate(forward, torch.rand(256, 3, size, size), seconds)
    return {"backbone": backbone, "layout": layout, "threads": threads, "image_size": size,
            "train_img_per_s": round(train_rate, 1), "predict_img_per_s": round(predict_rate, 1),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="cnn-small,resnet-mini")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default: %(default)s)")
    parser.add_argument("--out", default=None, help="append results here (JSON lines)")
    args = parser.parse_args()
    for backbone in args.backbones.split(","):
        for threads in args.threads:
            for layout in ("contiguous", "channels_last"):
                emit(measure(backbone, layout, threads, seconds=args.seconds), args.out)


if __name__ == "__main__":
    main()
