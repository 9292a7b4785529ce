"""Coverage sweep: torchvision's classifiers (but the huge ones) and one timm model per CNN family,
random weights with random BN statistics, through the Python API.

Per model: the coverage figures of `--equalize --correction` W8A8 (BN folded, conv/linear
quantized, activation quantizers ranged, layers equalized), the float64 invariance of the
float transforms (BN folding + equalization with residual regions, no absorption: max |output
change| on a random input), the pipeline's seconds, and the most common reason of each gap.

    nice -n 10 .venv/bin/python benchmarks/coverage.py            # table + results/coverage.json
    .venv/bin/python benchmarks/coverage.py --update --only densenet121   # re-measure some rows
    .venv/bin/python benchmarks/coverage.py --only timm:resnet18 mobilenet_v2
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torchvision  # noqa: E402
from conftest import randomize_bn  # noqa: E402

from dfq import DfqError, EqualizeConfig, PipelineConfig, quantize_model  # noqa: E402
from dfq.models import build  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402

# more than ~60M parameters (or VGG's 100M-weight classifiers): minutes each on 2 cores
HUGE = {
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "vit_b_16",
    "vit_b_32",
    "regnet_y_128gf",
    "regnet_y_32gf",
    "regnet_y_16gf",
    "regnet_x_32gf",
    "regnet_x_16gf",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "convnext_large",
    "convnext_base",
    "swin_b",
    "swin_v2_b",
    "wide_resnet101_2",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "alexnet",
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
}
# one small model per timm CNN family named in issue 11
TIMM = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "regnetx_002",
    "ghostnet_100",
    "rexnet_100",
    "mixnet_s",
    "convnext_atto",
    "densenet121",
    "dla34",
    "hrnet_w18_small",
    "res2net50_14w_8s",
    "resnest14d",
    "cspresnet50",
    "ese_vovnet19b_slim_dw",
    "repvgg_a0",
    "mobileone_s0",
    "lcnet_050",
    "tinynet_e",
    "nfnet_l0",
    "tf_efficientnet_lite0",
]


# inputs these need beyond --side (inception_v3's stem, maxvit's 7x7 windows)
SIDE = {"inception_v3": 96, "maxvit_t": 224}


def default_models() -> list[str]:
    tv = [
        n
        for n in sorted(torchvision.models.list_models(module=torchvision.models))
        if n not in HUGE
    ]
    return tv + [f"timm:{n}" for n in TIMM]


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = (
        {"aux_logits": False, "init_weights": False}
        if name in ("googlenet", "inception_v3")
        else {}
    )
    return randomize_bn(build(name, **kwargs).eval(), seed=1)


def invariance(model: torch.nn.Module, side: int) -> tuple[float, float]:
    """max |f(x) - g(x)| in float64, g = BN folded + equalized (chains and regions); max |f(x)|."""
    m = copy.deepcopy(model).double()
    cfg = PipelineConfig(
        quantize=False,
        equalize=True,
        absorption=False,
        equalization=EqualizeConfig(residual_regions=True),
    )
    g = quantize_model(m, cfg).model
    x = torch.randn(
        2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = m(x), g(x)
    return float((a - b).abs().max()), float(a.abs().max())


def top_reason(gaps: dict[str, str]) -> str:
    """The most common reason, and the kinds of node it names (node names without numbers)."""
    if not gaps:
        return ""
    why, n = Counter(gaps.values()).most_common(1)[0]
    stems = Counter(
        re.sub(r"(_\d+)+$", "", k.rsplit(".", 1)[-1]) for k, v in gaps.items() if v == why
    )
    short = why.removeprefix("BatchNorm left in float: ")
    short = "no data-free moments" if short.startswith("no data-free range") else short[:45]
    return f"{n}x {short} ({', '.join(s for s, _ in stems.most_common(3))})"


def run(name: str, side: int) -> dict:
    row: dict = {"model": name}
    try:
        model = make(name)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        t = time.perf_counter()
        res = quantize_model(model, PipelineConfig(equalize=True, correction=True))
        row["pipeline_s"] = round(time.perf_counter() - t, 2)
        row["coverage"] = res.coverage
        row["invariance_f64"], row["output_max_abs"] = invariance(model, SIDE.get(name, side))
    except DfqError as exc:
        row["refused"] = str(exc)
    except Exception as exc:  # a crash is a finding: record it, go on
        row["crash"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def table_row(r: dict) -> list:
    if "coverage" not in r:
        why = r.get("refused") or r.get("crash", "")
        return [
            r["model"],
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            ("refused: " if "refused" in r else "CRASH: ") + why[:90],
        ]
    c = r["coverage"]

    def frac(a: str, b: str) -> str:
        return f"{c[a]}/{c[b]}"

    gaps = "; ".join(f"{k}: {top_reason(v)}" for k, v in c["gaps"].items() if k != "equalized")
    return [
        r["model"],
        frac("bn_folded", "bn_total"),
        frac("layers_quantized", "layers_total"),
        frac("activations_ranged", "activation_quantizers_total"),
        frac("layers_equalized", "layers_total"),
        f"{r['invariance_f64']:.0e} ({r['output_max_abs']:.0e})"
        if "invariance_f64" in r
        else "CRASH: " + r.get("crash", "")[:60],
        r["pipeline_s"],
        gaps or "-",
    ]


HEADERS = [
    "model",
    "BN folded",
    "quantized",
    "ranged",
    "equalized",
    "f64 max abs Δ (max abs y)",
    "pipeline s",
    "gaps (top reason)",
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=None, help="these models only")
    p.add_argument(
        "--side", type=int, default=64, help="input side of the float64 invariance check"
    )
    p.add_argument("--out", type=Path, default=ROOT / "results" / "coverage.json")
    p.add_argument("--table", action="store_true", help="print --out's table only")
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure the --only models in --out's rows, keep the others",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.table:
        rows = json.loads(args.out.read_text())["models"]
        print(markdown_table(HEADERS, [table_row(r) for r in rows]))
        return {"models": rows}
    names = args.only or default_models()
    rows = []
    if args.update and args.out.exists():
        old = {r["model"]: r for r in json.loads(args.out.read_text())["models"]}
        rows = [old[n] for n in old if n not in names]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        t = time.perf_counter()
        rows.append(run(name, args.side))
        if args.update:
            order = {n: i for i, n in enumerate(default_models())}
            rows.sort(key=lambda r: order.get(r["model"], len(order)))
        print(
            f"[{i + 1}/{len(names)}] {name} {time.perf_counter() - t:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        args.out.write_text(
            json.dumps({"models": rows, "side": args.side, "torch": torch.__version__}, indent=1)
        )
    print(markdown_table(HEADERS, [table_row(r) for r in rows]))
    full = [r for r in rows if "coverage" in r and not set(r["coverage"]["gaps"]) - {"equalized"}]
    worst = max((r["invariance_f64"] for r in rows if "coverage" in r), default=0.0)
    print(
        f"\n{len(full)}/{len(rows)} models fully folded, quantized and ranged; "
        f"{sum('refused' in r for r in rows)} refused, {sum('crash' in r for r in rows)} crashed; "
        f"worst float64 output change {worst:.1e}"
    )
    return {"models": rows}


if __name__ == "__main__":
    main()
