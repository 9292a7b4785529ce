"""What a pipeline step hands to the next: the new graph, its statistics, and what it did to
each layer. Below every algorithm, so that quant/ and transforms/ share it without importing
each other.

What a step did to a layer is a `LayerRecord`: one typed, optional field per note any step
writes (a misspelt field is an AttributeError, not a silently new key). A report is a
`dict[str, LayerRecord]` (layer, quantized node or block name -> record); the JSON report is
written from the records with `to_dict` and read back with `from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import fx

from dfq.statistics.bn import Stats


@dataclass(slots=True, init=False, eq=False, repr=False)
class LayerRecord:
    """What the pipeline did to one layer (or activation quantizer, or reconstructed block).

    Every field is optional (None when no step set it); `to_dict` emits the fields that were
    set, in the order they were first set (what the string-keyed notes gave). `extra`: notes of
    user steps that no field names (emitted after the fields)."""

    # trace
    type: str | None = None  # the module's class name
    kind: str | None = None  # dfq.graph.ops.layer_kind
    shape: list[int] | None = None  # weight shape
    lifted: str | None = None  # how a functional call was lifted to a module
    # fold_bn: the folded BN's name, or False (then `note` says why)
    bn_folded: str | bool | None = None
    note: str | None = None  # why a BN / input width / activation range is missing
    # relu6
    relu6: str | None = None
    # equalize
    equalized: bool | None = None
    equalize_note: str | None = None  # why the layer was not equalized
    equalized_with: str | None = None
    equalize_sweeps: int | None = None
    range_spread_before: float | None = None
    range_spread_after: float | None = None
    channel_ranges_before: list[float] | None = None
    channel_ranges_after: list[float] | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    equalize_power: float | None = None  # equalization search
    pair_mse_closed_form: float | None = None
    pair_mse_chosen: float | None = None
    equalized_region: str | None = None  # residual / concatenation regions
    region_spread_before: float | None = None
    region_spread_after: float | None = None
    kept_clip: str | None = None
    # absorb_bias
    absorption_note: str | None = None
    absorbed_channels: int | None = None
    absorbed_max: float | None = None
    # clip_weight
    clipped_weights: int | None = None
    # quantize_weights
    bits_weight: int | None = None
    weight_sqnr_db: float | None = None
    weight_range: list[float] | None = None
    # bias_correction
    bias_correction: str | None = None
    bias_correction_max: float | None = None
    activation_bias_correction: str | None = None  # why it was skipped
    activation_bias_correction_max: float | None = None
    # activation_ranges (bits_input on the layers; the others on the activations report)
    bits_input: int | None = None
    activation_range: list[float] | None = None
    bits: int | None = None
    # quantize_bias, simulation
    bias: str | None = None
    simulation: str | None = None
    # reconstruct (per block)
    layers: list[str] | None = None
    mse_before: float | None = None
    mse_after: float | None = None
    learned: bool | None = None
    undecided: float | None = None
    iterations: int | None = None
    cut_by_time: bool | None = None
    window: str | None = None  # the spatial window each iteration learned on
    window_note: str | None = None  # why a block learned on whole maps
    seconds: float | None = None
    # user steps
    extra: dict[str, Any] = field(default_factory=dict)
    _order: list[str] = field(default_factory=list)  # the fields set, in order

    def __init__(self, **values: Any) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, None)
        object.__setattr__(self, "extra", {})
        object.__setattr__(self, "_order", [])
        for name, value in values.items():
            if name != "extra" and name not in FIELDS:
                raise TypeError(f"LayerRecord has no field {name!r}")
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "extra":
            object.__setattr__(self, name, dict(value))
            return
        if name not in FIELDS:
            raise AttributeError(f"LayerRecord has no field {name!r}")
        object.__setattr__(self, name, value)
        if name not in self._order:
            self._order.append(name)

    def __delattr__(self, name: str) -> None:
        """`del rec.field`: the field is unset again (no error when it was not set)."""
        if name not in FIELDS:
            raise AttributeError(f"LayerRecord has no field {name!r}")
        object.__setattr__(self, name, None)
        if name in self._order:
            self._order.remove(name)

    def is_set(self, name: str) -> bool:
        """Whether a step set `name` (a field set to None is set)."""
        if name not in FIELDS:
            raise AttributeError(f"LayerRecord has no field {name!r}")
        return name in self._order

    def merge(self, other: LayerRecord) -> LayerRecord:
        """In place: the fields `other` set overwrite this record's (as dict.update); self."""
        for name in other._order:
            setattr(self, name, getattr(other, name))
        self.extra.update(other.extra)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields that were set, in the order they were set, then `extra`."""
        return {**{name: getattr(self, name) for name in self._order}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        """A record from `to_dict`'s output (e.g. a saved report); keys that name no field go to
        `extra`."""
        rec = cls()
        for k, v in d.items():
            if k in FIELDS:
                setattr(rec, k, v)
            else:
                rec.extra[k] = v
        return rec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerRecord):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "LayerRecord(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


FIELDS = frozenset(
    f.name for f in dataclasses.fields(LayerRecord) if f.name not in ("extra", "_order")
)

Records = dict[str, LayerRecord]  # a report: layer (node, block) name -> its record


def records_to_dict(records: Records) -> dict[str, dict[str, Any]]:
    """A report as JSON-ready dicts (name -> the record's set fields)."""
    return {name: rec.to_dict() for name, rec in records.items()}


def records_from_dict(d: dict[str, dict[str, Any]]) -> Records:
    """A report back from `records_to_dict`'s output."""
    return {name: LayerRecord.from_dict(v) for name, v in d.items()}


def merge_records(into: Records, records: Records) -> Records:
    """In place: each record of `records` merged into `into`'s record of the same name (a new
    one when there is none); `into`."""
    for name, rec in records.items():
        if not isinstance(rec, LayerRecord):
            raise TypeError(
                f"the record of {name!r} is a {type(rec).__name__}: steps report LayerRecords "
                "(dfq.records.LayerRecord; notes no field names go in its `extra`)"
            )
        if name in into:
            into[name].merge(rec)
        else:
            into[name] = LayerRecord().merge(rec)
    return into


class Transformed(NamedTuple):
    gm: fx.GraphModule
    stats: Stats
    info: Records
