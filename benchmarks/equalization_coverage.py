"""How many weighted layers equalization leaves alone: chain pairs only (the paper) against
regions (`--equalize_residuals`: adds, concatenations, channel padding, fan-outs), with ReLU6
replaced (--relu) and kept. Random BN statistics (coverage depends on the graph, not weights).

    .venv/bin/python benchmarks/equalization_coverage.py   # table, results/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torchvision  # noqa: E402
from conftest import randomize_bn  # noqa: E402

from dfq import EqualizeConfig, equalize, fold_batchnorm, replace_relu6, trace  # noqa: E402
from dfq.models import build  # noqa: E402
from dfq.records import Records  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402

MODELS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "resnet18": lambda: torchvision.models.resnet18(),
    "cifar_resnet20": lambda: build("cifar_resnet20"),
    "cifar_resnet56": lambda: build("cifar_resnet56"),
    "deeplabv3plus_mobilenetv2": lambda: build("deeplabv3plus_mobilenetv2"),
    "ssdlite_mobilenetv2": lambda: build("ssdlite_mobilenetv2"),
}


def left_alone(info: Records, layers: set[str]) -> list[str]:
    return sorted(k for k, v in info.items() if k in layers and v.is_set("equalize_note"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "results" / "equalization_coverage.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, res = [], {}
    for name, make in MODELS.items():
        t = fold_batchnorm(trace(randomize_bn(make().eval(), seed=1)))
        layers = {
            n.target
            for n in t.gm.graph.nodes
            if n.op == "call_module"
            and isinstance(t.gm.get_submodule(n.target), (torch.nn.Conv2d, torch.nn.Linear))
        }
        res[name] = {"layers": len(layers)}
        row = [name, len(layers)]
        for relu in (True, False):
            base = replace_relu6(t.gm, t.stats) if relu else t
            for regions in (False, True):
                eq = equalize(base.gm, base.stats, EqualizeConfig(residual_regions=regions))
                left = left_alone(eq.info, layers)
                res[name][
                    f"{'relu' if relu else 'relu6_kept'}_{'regions' if regions else 'chains'}"
                ] = left
                row.append(len(left))
        rows.append(row)
    print(
        markdown_table(
            [
                "model",
                "weighted layers",
                "--relu chains",
                "--relu regions",
                "ReLU6 kept chains",
                "ReLU6 kept regions",
            ],
            rows,
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
