"""Readable tables of what was done to which layer, and of accuracy runs (Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dfq.records import Records


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):  # accuracies keep their hundredths (59.009 is "59.01", not "59")
            if 1 <= abs(v) < 1e4:
                return f"{v:.2f}"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]
    )


LAYER_COLUMNS = [
    ("layer", None),
    ("kind", "kind"),
    ("BN", "bn_folded"),
    ("equalized with", "equalized_with"),
    ("spread before", "range_spread_before"),
    ("spread after", "range_spread_after"),
    ("absorbed", "absorbed_max"),
    ("clipped", "clipped_weights"),
    ("W bits", "bits_weight"),
    ("in bits", "bits_input"),
    ("W SQNR dB", "weight_sqnr_db"),
    ("bias corr", "bias_correction_max"),
    ("note", "equalize_note"),
]


def layer_table(layers: Records) -> str:
    """One row per conv/linear layer (those with a kind), in model order."""
    rows = []
    for name, rec in layers.items():
        if rec.kind is None:
            continue
        row = [name]
        for _, key in LAYER_COLUMNS[1:]:
            v = getattr(rec, key)
            row.append("yes" if v is True or (key == "bn_folded" and isinstance(v, str)) else v)
        rows.append(row)
    return markdown_table([h for h, _ in LAYER_COLUMNS], rows)


def plot_weight_ranges(layers: Records, out_dir: str | Path) -> Path | None:
    """Per-channel weight ranges of the worst-conditioned equalized layer, before and after
    (the DFQ paper's Figure 2), as a PNG; None if nothing was equalized."""
    worst = max(
        (name for name, rec in layers.items() if rec.channel_ranges_before is not None),
        key=lambda n: layers[n].range_spread_before,
        default=None,
    )
    if worst is None:
        return None
    from dfq.utils.deps import require

    require("matplotlib", "--plot").use("Agg")
    import matplotlib.pyplot as plt

    rec = layers[worst]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, title in (
        (axes[0], "channel_ranges_before", "before"),
        (axes[1], "channel_ranges_after", "after"),
    ):
        r = getattr(rec, key)
        ax.bar(range(len(r)), r, width=1.0, color="tab:blue" if title == "before" else "tab:green")
        spread = getattr(rec, "range_spread_" + title)
        ax.set_title(f"{worst}: {title} equalization (max/median {spread:.1f})")
        ax.set_xlabel("output channel")
    axes[0].set_ylabel("max |w| per channel")
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"weight_ranges_{worst.replace('.', '_')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
