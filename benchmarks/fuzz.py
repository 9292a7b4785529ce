"""Fuzz the whole pipeline with N random architectures (tests/strategies.py) and report
crashes (any exception) and invariance failures (tests/fuzz_checks.py), with the time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py            # 1000 architectures
    .venv/bin/python benchmarks/fuzz.py -n 200 --seed 1000 --show 5  # another 200, 5 details

Architecture i is `random_spec(seed + i)` with config `random_quant_config(Random(seed + i))`,
so any failure is reproduced by its index alone. Writes results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from fuzz_checks import InvariantError, check_architecture, random_quant_config  # noqa: E402
from strategies import random_spec  # noqa: E402


def run_one(i: int) -> dict:
    r = random.Random(i)
    bits = r.choice([8, 16])
    cfg = random_quant_config(r)
    train = r.random() < 0.2
    t = time.perf_counter()
    try:
        out = {"status": "ok", **check_architecture(random_spec(i), cfg, bits, train)}
    except InvariantError as exc:
        out = {"status": "invariance", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a crash is what we count
        out = {
            "status": "crash",
            "error": f"{type(exc).__name__}: {exc}",
            "where": traceback.format_exc().splitlines()[-3].strip(),
        }
    return {"index": i, "bits": bits, "seconds": round(time.perf_counter() - t, 4), **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=10, help="print this many failures in full")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "fuzz.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("dfq").setLevel(
        logging.ERROR
    )  # "model in training mode" notes, 4 per such model
    t0 = time.perf_counter()
    rows = [run_one(args.seed + k) for k in range(args.n)]
    total = time.perf_counter() - t0
    by = {s: [r for r in rows if r["status"] == s] for s in ("ok", "crash", "invariance")}
    ok = by["ok"]
    skipped = [r for r in ok if "skipped" in r]
    summary = {
        "count": len(rows),
        "crashes": len(by["crash"]),
        "invariance_failures": len(by["invariance"]),
        "skipped_nonfinite_float_model": len(skipped),
        "seconds": round(total, 1),
        "seconds_per_arch": round(total / max(1, len(rows)), 3),
        "float_err_max": max((r["float_err"] for r in ok if "float_err" in r), default=None),
        "absorption_exact_err_max": max(
            (r["absorb_err"] for r in ok if r.get("absorb_exact")), default=None
        ),
        "absorption_premise_held": sum(bool(r.get("absorb_exact")) for r in ok),
        "bounded_sqnr_checks": sum(bool(r.get("bounded")) for r in ok),
    }
    for bits in (8, 16):
        v = [r["sqnr_db"] for r in ok if r.get("bounded") and r["bits"] == bits]
        if v:
            summary[f"w{bits}a{bits}_calibrated_sqnr_db"] = {
                "min": round(min(v), 1),
                "median": round(statistics.median(v), 1),
                "n": len(v),
            }
    print(
        f"{'count':>8} {'crashes':>8} {'invariance':>11} {'skipped':>8} {'time s':>8} {'s/arch':>7}"
    )
    print(
        f"{summary['count']:>8} {summary['crashes']:>8} {summary['invariance_failures']:>11} "
        f"{len(skipped):>8} {summary['seconds']:>8} {summary['seconds_per_arch']:>7}"
    )
    print(
        f"float64 fold+equalize max error: {summary['float_err_max']:.2e}; absorption exact on "
        f"{summary['absorption_premise_held']} "
        f"(max error {summary['absorption_exact_err_max'] or 0:.2e})"
    )
    for bits in (8, 16):
        if f"w{bits}a{bits}_calibrated_sqnr_db" in summary:
            s = summary[f"w{bits}a{bits}_calibrated_sqnr_db"]
            print(
                f"W{bits}A{bits} calibrated SQNR dB: min {s['min']}, median {s['median']} "
                f"(n={s['n']})"
            )
    for r in (by["crash"] + by["invariance"])[: args.show]:
        print(
            f"  #{r['index']} {r['status']}: {r['error']}"
            + (f"  [{r['where']}]" if "where" in r else "")
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "summary": summary,
                "command": " ".join(sys.argv),
                "failures": by["crash"] + by["invariance"],
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
