"""Post-training reconstruction: learned weight rounding (AdaRound) and activation step sizes
(LSQ), block by block, on a few (distilled) images.

Below 8 bits, rounding each weight to nearest is far from the best integer grid point for the
layer's *output*, and BN-derived activation ranges are guesses. Both are fixed here by
minimising each block's output error against the FP32 model, as AdaRound (Nagel et al. 2020)
and BRECQ (Li et al. 2021) do with real data:

- A block is what the graph says: the nodes between two quantized tensors that are each the only
  value alive (a residual block is one, since its input stays alive until the add), grouped by the
  module that owns the layers (`features.3`, `layer1.0`), else single layers.
- Each weight is floor(w/s) + h(V), h = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), with a
  regulariser that pushes h to 0 or 1 while its exponent beta anneals from 20 to 2; at the end
  h is rounded to 0/1, so every weight is still `scale * (int - zero_point)` on its grid.
- Each activation quantizer in the block learns log(scale) with straight-through rounding.
- Inputs come from the already-reconstructed quantized model (errors of earlier blocks are
  seen and compensated), optionally mixed with FP32 inputs element-wise (QDrop's idea).
- Images are used with their mirror images (by default): twice the inputs to match FP32 on,
  at no distillation cost.
- A block whose error does not decrease keeps its round-to-nearest weights and scales.
- With `window`, each iteration of a local block (convolutions, activations, adds) learns on a
  spatial window of its maps (dfq.graph.windows), checked to compute the same outputs: a
  fraction of the cost, so more iterations in the same time.

The number of iterations decides the result (seeded batch order and masks); the time budget is
only a cap, and it warns loudly when it cuts.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx
from torch.func import functional_call

from dfq.config import ReconstructConfig
from dfq.errors import DfqError
from dfq.graph.subgraph import subgraph
from dfq.graph.windows import Window, plan_window, window_is_exact
from dfq.quant.activations import input_quantizer, snap_clips_to_grid_
from dfq.quant.modules import ActQuant, QuantizedLayer
from dfq.quant.primitives import dequantize, round_ste
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats
from dfq.utils.memory_format import set_memory_format_

log = logging.getLogger("dfq")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1
_CHUNK = 32  # images per forward pass outside the optimisation (bounds peak memory)


@dataclass
class Block:
    """A contiguous run of graph nodes with one input tensor and one output tensor."""

    name: str
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    layers: list[str]


def _is(gm: fx.GraphModule, node: fx.Node, kind: type) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kind)


def _owner(name: str) -> str:
    """The module a layer belongs to, for grouping: `features.3.conv.0.0` -> `features.3`."""
    return ".".join(name.split(".")[:2])


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """The reconstruction blocks of `gm` in topological order (every node in exactly one)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise DfqError("`reconstruct` supports models with one input tensor.")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out_node.args[0], fx.Node):
        raise DfqError("`reconstruct` supports models with one output tensor.")
    pos = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    last = {n: max((pos.get(u, end) for u in n.users), default=pos[n]) for n in nodes}
    # cuts: after a quantizer whose output is the only value alive (a block ends on a quantized
    # tensor, so its error is measured where the next layer reads it, after the activation)
    units: list[tuple[list[fx.Node], fx.Node, fx.Node]] = []
    alive: set[fx.Node] = set()
    start, start_value = 1, nodes[0]
    for i, n in enumerate(nodes):
        alive.add(n)
        alive = {a for a in alive if last[a] > i}
        if len(alive) == 1 and i >= start and _is(gm, next(iter(alive)), ActQuant):
            (value,) = alive
            units.append((nodes[start : i + 1], start_value, value))
            start, start_value = i + 1, value
    if start < end:
        units.append((nodes[start:], start_value, out_node.args[0]))

    def layers_of(ns):
        return [n.target for n in ns if _is(gm, n, QuantizedLayer)]

    # weightless units join the next unit (the last ones the previous), then group by owner
    merged: list[list] = []
    pending: list[tuple] = []
    for unit in units:
        pending.append(unit)
        if layers_of(unit[0]):
            merged.append(pending)
            pending = []
    if pending:
        if not merged:
            raise DfqError("`reconstruct` found no quantized conv/linear layer in the model.")
        merged[-1].extend(pending)
    groups: list[list] = []
    for group in merged:
        first = layers_of([n for unit in group for n in unit[0]])[0]
        if groups and _owner(layers_of([n for u in groups[-1] for n in u[0]])[-1]) == _owner(first):
            groups[-1].extend(group)
        else:
            groups.append(list(group))
    blocks = []
    for group in groups:
        ns = [n for unit in group for n in unit[0]]
        layers = layers_of(ns)
        name = _owner(layers[0]) if len({_owner(x) for x in layers}) == 1 else layers[0]
        blocks.append(Block(name, ns, group[0][1], group[-1][2], layers))
    return blocks


def _float_block(gm_q: fx.GraphModule, gm_f: fx.GraphModule, block: Block) -> fx.GraphModule:
    """The FP32 model's counterpart of a quantized block: the same nodes without quantizers."""
    by_name = {n.name: n for n in gm_f.graph.nodes}

    def counterpart(n: fx.Node) -> fx.Node:
        while _is(gm_q, n, ActQuant):
            n = n.args[0]
        return by_name[n.name]

    nodes = [by_name[n.name] for n in block.nodes if not _is(gm_q, n, ActQuant)]
    return subgraph(gm_f, nodes, counterpart(block.input), counterpart(block.output))


def _run(module: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(c) for c in x.split(_CHUNK)])


ALPHAS = torch.linspace(0.3, 1.0, 15).tolist()  # scale multipliers searched for weights
_SCALE_SAMPLES = 1 << 22  # values a step-size search sees (strided; 128 images at 224 px give 150M)
ACT_ALPHAS = torch.logspace(-1, 0.2, 25).tolist()  # and for activations (BN ranges are wide)


def _best_scale(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, grid, axis: int | None, alphas=ALPHAS
) -> torch.Tensor:
    """The multiple of `scale` (per channel along `axis`, else per tensor) whose grid
    reproduces `x` with the least squared error, searched over `alphas`."""
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    best, best_err = scale.clone(), None
    for a in alphas:
        s = scale * a
        q = torch.clamp(torch.round(x / s) + zp, grid.qmin, grid.qmax)
        err = ((q - zp) * s - x).double().pow(2).sum(dims, keepdim=axis is not None)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


class _Rounding:
    """AdaRound's variables for one quantized layer, from the FP32 weight it approximates."""

    def __init__(self, layer: QuantizedLayer, w_float: torch.Tensor, init_scale: bool = False):
        self.layer = layer
        shape = [-1] + [1] * (w_float.dim() - 1)
        axis = layer.weight_axis
        self.scale = layer.weight_scale.reshape(shape) if axis is not None else layer.weight_scale
        self.zp = (
            layer.weight_zero_point.reshape(shape) if axis is not None else layer.weight_zero_point
        )
        if init_scale:  # min/max wastes levels on outliers at 4 bits: the scale of least error
            best = _best_scale(w_float, self.scale, self.zp, layer.weight_grid, axis)
            with torch.no_grad():
                layer.weight_scale.copy_(best.reshape(layer.weight_scale.shape))
        v = w_float.double() / self.scale.double()
        self.floor = torch.floor(v).to(w_float.dtype)
        rest = (v - torch.floor(v)).clamp(1e-4, 1 - 1e-4)  # h(V) starts at the fraction
        self.v = (
            (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).to(w_float.dtype).requires_grad_(True)
        )

    def weight(self, hard: bool = False) -> torch.Tensor:
        h = (self.v >= 0).to(self.floor.dtype) if hard else _h(self.v)  # h(V) >= 0.5 <=> V >= 0
        g = self.layer.weight_grid
        q = torch.clamp(self.floor + h + self.zp, g.qmin, g.qmax) - self.zp
        return q * self.scale

    def undecided(self) -> tuple[int, int]:
        """How many rounding variables are still between their two grid points (h(V) in
        (0.01, 0.99)), of how many: the hard decision changes these from what was learned."""
        h = _h(self.v.detach())
        return int(((h > 0.01) & (h < 0.99)).sum()), h.numel()

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def commit_(self) -> None:
        """Hard 0/1 decisions, written as the layer's weights (exactly on its integer grid)."""
        with torch.no_grad():
            h = (self.v >= 0).to(torch.int64)
            g = self.layer.weight_grid
            q = torch.clamp(
                self.floor.to(torch.int64) + h + self.zp.to(torch.int64), g.qmin, g.qmax
            )
            self.layer.weight.copy_(
                dequantize(
                    q,
                    self.layer.weight_scale,
                    self.layer.weight_zero_point,
                    self.layer.weight_axis,
                    self.layer.weight.dtype,
                )
            )


def _stack(batches: Iterable[torch.Tensor], limit: int | None) -> torch.Tensor:
    batches = [b.detach().float().cpu() for b in batches]
    shapes = sorted({tuple(b.shape[1:]) for b in batches})
    if len(shapes) > 1:
        raise DfqError(
            f"`reconstruct` needs its images in one size; got batches of {shapes}.",
            "resize or crop the calibration images to the model's input size",
        )
    x = torch.cat(batches)
    return x[:limit] if limit else x


class _BlockState:
    """What one block learns: rounding variables, log step sizes, bias offsets. `overrides()`
    gives the block's parameters for `functional_call`, soft or hard; biases are always put on
    the int32 grid at s_weight * s_input the runtime will use (`int32_bias`), because at 4 bits
    that grid is coarse enough to matter."""

    def __init__(
        self,
        gm_q: fx.GraphModule,
        gm_f: fx.GraphModule,
        block: Block,
        config: ReconstructConfig,
        int32_bias: bool,
    ):
        names = {id(m): k for k, m in gm_q.named_modules()}
        nodes = {n.target: n for n in block.nodes if n.op == "call_module"}
        self.layers = {k: gm_q.get_submodule(k) for k in block.layers}
        self.saved_wscale = {k: m.weight_scale.detach().clone() for k, m in self.layers.items()}
        self.roundings = (
            {k: _Rounding(m, gm_f.get_submodule(k).weight.detach()) for k, m in self.layers.items()}
            if config.learn_rounding
            else {}
        )
        quantizers = {
            n.target: gm_q.get_submodule(n.target)
            for n in block.nodes
            if _is(gm_q, n, ActQuant) and gm_q.get_submodule(n.target).quantizing
        }
        self.quantizers = quantizers if config.learn_scales else {}
        self.log_scales = {
            k: aq.scale.detach().log().requires_grad_(True) for k, aq in self.quantizers.items()
        }
        # each step size as it starts, with its log: exp(log(s)) can be an ulp off s, and a
        # step size nothing moved must stay the one round to nearest had
        self.start_scales = {
            k: (aq.scale.detach().clone(), self.log_scales[k].detach().clone())
            for k, aq in self.quantizers.items()
        }
        self.biases = {
            k: torch.zeros_like(m.bias, requires_grad=True)
            for k, m in self.layers.items()
            if m.bias is not None and config.bias_lr > 0
        }
        self.float_bias = {
            k: m.bias.detach().clone() for k, m in self.layers.items() if m.bias is not None
        }
        self.input_q = {}  # layer -> name of the quantizer its input is read from
        if int32_bias:
            for k in self.float_bias:
                aq = input_quantizer(gm_q, nodes[k])
                if aq is not None:
                    self.input_q[k] = names[id(aq)]
        self.gm_q = gm_q
        self.w_float = {k: gm_f.get_submodule(k).weight.detach() for k in self.roundings}
        self.saved = (
            {k: m.weight.detach().clone() for k, m in self.layers.items()},
            {k: aq.scale.detach().clone() for k, aq in self.quantizers.items()},
        )

    def param_groups(self, config: ReconstructConfig) -> list[dict]:
        groups = [
            (list(r.v for r in self.roundings.values()), config.round_lr),
            (list(self.log_scales.values()), config.scale_lr),
            (list(self.biases.values()), config.bias_lr),
        ]
        return [{"params": p, "lr": lr} for p, lr in groups if p]

    def _scale(self, name: str) -> torch.Tensor:
        s = self.log_scales.get(name)
        return s.exp() if s is not None else self.gm_q.get_submodule(name).scale

    def overrides(self, hard: bool = False) -> dict[str, torch.Tensor]:
        over = {f"{k}.weight": r.weight(hard) for k, r in self.roundings.items()}
        over.update({f"{k}.scale": self._scale(k) for k in self.log_scales})
        for k, b in self.float_bias.items():
            if k in self.biases:
                b = b + self.biases[k]
            if k in self.input_q:
                s = self.layers[k].weight_scale * self._scale(self.input_q[k])
                b = round_ste(b / s) * s
            over[f"{k}.bias"] = b
        return over

    def undecided(self) -> float:
        """The share of the block's rounding variables the hard decisions will change."""
        counts = [r.undecided() for r in self.roundings.values()]
        return sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))

    def commit_(self) -> None:
        """The hard rounding, learned scales and (grid) biases into the modules."""
        with torch.no_grad():
            over = self.overrides(hard=True)
            for r in self.roundings.values():
                r.commit_()
            for k, aq in self.quantizers.items():
                start, log_start = self.start_scales[k]
                unmoved = torch.equal(self.log_scales[k].detach(), log_start)
                aq.scale.copy_(start if unmoved else self._scale(k))
            for k in self.float_bias:
                self.layers[k].bias.copy_(over[f"{k}.bias"])

    def restore_(self) -> None:
        """Back to round to nearest, the starting scales and the float biases."""
        with torch.no_grad():
            for k, m in self.layers.items():
                m.weight.copy_(self.saved[0][k])
                if k in self.float_bias:
                    m.bias.copy_(self.float_bias[k])
            for k, aq in self.quantizers.items():
                aq.scale.copy_(self.saved[1][k])
            for k, m in self.layers.items():
                m.weight_scale.copy_(self.saved_wscale[k])

    def init_scales_(self, block: fx.GraphModule, x: torch.Tensor) -> None:
        """Weight scales (per channel) and the learned quantizers' step sizes start at the
        multiple of least squared error, weights on themselves, activations on their inputs
        seen on `x` (searched below and a little above the data-free range)."""
        self.roundings = {k: _Rounding(self.layers[k], w, True) for k, w in self.w_float.items()}
        seen: dict[str, list[torch.Tensor]] = {k: [] for k in self.quantizers}
        hooks = [
            aq.register_forward_pre_hook(lambda mod, inp, k=k: seen[k].append(inp[0].detach()))
            for k, aq in self.quantizers.items()
        ]
        try:
            with torch.no_grad():
                functional_call(block, self.overrides(hard=True), (x,))
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for k, aq in self.quantizers.items():
                if seen[k]:
                    v = torch.cat([t.flatten() for t in seen[k]])
                    v = v[:: max(1, len(v) // _SCALE_SAMPLES)]  # enough to place a step size
                    best = _best_scale(v, aq.scale, aq.zero_point, aq.grid, None, ACT_ALPHAS)
                    aq.scale.copy_(best)
                    self.log_scales[k].copy_(best.log())
                    self.start_scales[k] = (best.clone(), self.log_scales[k].detach().clone())


def _take(x: torch.Tensor, idx: torch.Tensor, window: tuple[slice, ...]) -> torch.Tensor:
    """Images `idx` of `x`, cut to the spatial `window` (copying only the window)."""
    if not window:
        return x[idx]
    return x[(slice(None), slice(None), *window)][idx].contiguous(memory_format=torch.channels_last)


def _window(gm_q, block, q_block, state, config, x_q, target) -> tuple[Window | None, str]:
    """The block's learning window (None: whole maps) and, when none, why."""
    if not config.window or not config.iterations:
        return None, ""
    window, why = plan_window(gm_q, block.nodes, x_q.shape, target.shape, config.window)
    if window is None:
        return None, why

    def run(x):
        return functional_call(q_block, state.overrides(hard=True), (x,))

    if not window_is_exact(run, window, x_q[:2]):
        return None, "its outputs on a window differ from whole maps (a global op)"
    return window, ""


def _mse(module: fx.GraphModule, over: dict, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        total = sum(
            float((functional_call(module, over, (c,)) - t).double().pow(2).sum())
            for c, t in zip(x.split(_CHUNK), target.split(_CHUNK))
        )
    return total / target.numel()


def reconstruct(
    gm_q: fx.GraphModule,
    stats: Stats,
    gm_f: fx.GraphModule,
    data: Iterable[torch.Tensor],
    config: ReconstructConfig = ReconstructConfig(),
    progress: bool = False,
    int32_bias: bool = True,
) -> Transformed:
    """A copy of the fake-quant `gm_q` whose weight rounding and activation step sizes are
    learned block by block to reproduce `gm_f` (its FP32 model, same node names) on `data`.
    `int32_bias`: biases will be quantized at s_weight * s_input (learn with that grid).
    Info: per block, its layers, the output MSE before and after, iterations, seconds and the
    share of rounding variables still undecided when the hard 0/1 decisions were taken."""
    import copy

    from tqdm.auto import tqdm

    # channels-last copies (the result is put back)
    gm_q = set_memory_format_(copy.deepcopy(gm_q), torch.channels_last)
    gm_f = set_memory_format_(copy.deepcopy(gm_f).eval(), torch.channels_last)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_f = _stack(data, config.images)
    if x_f.dim() == 4:
        if config.mirror:  # more inputs to match FP32 on, for free (a flip keeps them images)
            x_f = torch.cat([x_f, x_f.flip(-1)])
        x_f = x_f.contiguous(memory_format=torch.channels_last)
    x_q = x_f
    n = len(x_f)
    bs = min(config.batch_size, n)
    blocks = find_blocks(gm_q)
    info: Records = {}
    t_start = time.perf_counter()
    cut_blocks = []
    for bi, block in enumerate(blocks):
        t_block = time.perf_counter()
        q_block = subgraph(gm_q, block.nodes, block.input, block.output)
        target = _run(_float_block(gm_q, gm_f, block), x_f)
        state = _BlockState(gm_q, gm_f, block, config, int32_bias)
        before = _mse(q_block, state.overrides(hard=True), x_q, target)
        if config.init_scales and config.iterations:
            state.init_scales_(q_block, x_q[: config.batch_size * 4])
        params = state.param_groups(config)
        window, window_note = _window(gm_q, block, q_block, state, config, x_q, target)
        its, cut = 0, False
        if params and config.iterations:
            opt = torch.optim.Adam(params)
            for aq in state.quantizers.values():
                aq.learn_scale = True
            warm = int(config.warmup * config.iterations)
            b0, b1 = config.beta
            bar = tqdm(
                total=config.iterations,
                desc=f"reconstruct {block.name}",
                disable=not progress,
                leave=False,
            )
            try:
                for it in range(config.iterations):
                    if (
                        config.seconds is not None
                        and time.perf_counter() - t_start > config.seconds
                    ):
                        cut = True
                        break
                    idx = torch.randint(0, n, (bs,), generator=gen)
                    inp, valid, full = window.draw(gen) if window else ((), (), ())
                    xb = _take(x_q, idx, inp)
                    if config.fp_input_mix > 0:
                        mask = torch.rand(xb.shape, generator=gen) < config.fp_input_mix
                        xb = torch.where(mask, _take(x_f, idx, inp), xb)
                    out = functional_call(q_block, state.overrides(), (xb,))[(..., *valid)]
                    tb = _take(target, idx, full)
                    rec = (out - tb).pow(2).sum(1).mean()  # BRECQ's reconstruction loss
                    loss = rec
                    if state.roundings and it >= warm:
                        rel = (it - warm) / max(1, config.iterations - warm)
                        beta = b1 + (b0 - b1) * (1 - rel)
                        reg = sum(r.regulariser(beta) for r in state.roundings.values())
                        loss = rec + config.round_weight * reg
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    its += 1
                    bar.update(1)
                    if it % 10 == 0:
                        bar.set_postfix(rec=f"{rec.item():.4g}", loss=f"{loss.item():.4g}")
            finally:
                bar.close()
                for aq in state.quantizers.values():
                    aq.learn_scale = False
        undecided = state.undecided() if its else 0.0
        state.commit_()
        after = _mse(q_block, {}, x_q, target)
        kept = after <= before or not math.isfinite(before)
        if not kept:  # no better than round to nearest: keep that
            state.restore_()
            state = _BlockState(gm_q, gm_f, block, config, int32_bias)
            state.commit_()  # (the grid biases of round to nearest)
            after = _mse(q_block, {}, x_q, target)
        if cut:
            cut_blocks.append(block.name)
        x_q, x_f = _run(q_block, x_q), target
        info[block.name] = LayerRecord(
            layers=block.layers,
            mse_before=before,
            mse_after=after,
            learned=kept and its > 0,
            undecided=round(undecided, 4),
            iterations=its,
            cut_by_time=cut,
            window=window.describe() if window else None,
            window_note=window_note or None,
            seconds=round(time.perf_counter() - t_block, 2),
        )
        if progress:
            log.info(
                "reconstruct %s (%d/%d): MSE %.4g -> %.4g%s",
                block.name,
                bi + 1,
                len(blocks),
                before,
                after,
                "" if kept else " (kept round-to-nearest)",
            )
    if cut_blocks:
        shown = ", ".join(cut_blocks[:5]) + (", ..." if len(cut_blocks) > 5 else "")
        msg = (
            f"`reconstruction.seconds`={config.seconds} cut the reconstruction of "
            f"{len(cut_blocks)} of {len(blocks)} blocks ({shown}): the result depends on the "
            "machine's speed; raise the budget or lower `reconstruction.iterations`"
        )
        warnings.warn(msg, stacklevel=2)
        log.warning("WARNING: %s", msg)
    snap_clips_to_grid_(gm_q)
    return Transformed(set_memory_format_(gm_q, torch.contiguous_format), stats, info)
