"""Where a run executes: its device, and the processes of a `torchrun` that share its work.

`torchrun --standalone --nproc_per_node=N -m dfq cls ...` starts N processes (gloo on the CPU,
nccl on CUDA). Each runs the quantization pipeline itself (it is deterministic: single-threaded,
no randomness; `check_identical` proves every rank holds the same model), evaluates every N-th
batch of the same batches a single process would see, and gathers the per-batch results in batch
order, so every figure equals the single-process one. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset

from dfq.errors import DfqError


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def resolve_device(spec: str = "auto") -> torch.device:
    """auto = CUDA when available (this process's GPU under torchrun), else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DfqError(
            f"`device`={spec}: this machine has no CUDA device.", "use `device`=cpu (or auto)"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise DfqError(
            f"`device`={spec}: only {torch.cuda.device_count()} CUDA device(s).",
            "use `device`=cuda:0",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DfqError("`device`=mps: MPS is not available here.", "use `device`=cpu (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join the process group torchrun describes in the environment for the run, and leave it
    after (nothing without torchrun). A run that ends normally meets its peers at a barrier
    first, so no rank tears gloo down while another still holds the connection."""
    import torch.distributed as dist

    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield world()
        if joined:
            dist.barrier()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def mine(count: int) -> list[int]:
    """The indices (of batches, of distillation batches) this process works on."""
    rank, size = world()
    return list(range(rank, count, size))


def shard_batches(batches):
    """(this process's batches, their indices), or (batches, None) in a single process.

    Lists are split by index; a DataLoader is rebuilt over the items of its owned batches with
    the same batch size, so batch boundaries (and per-batch arithmetic) stay as in one process.
    """
    rank, size = world()
    if size == 1:
        return batches, None
    if isinstance(batches, DataLoader):
        n, bs = len(batches.dataset), batches.batch_size
        owned = mine(len(batches))
        items = [i for b in owned for i in range(b * bs, min((b + 1) * bs, n))]
        loader = DataLoader(
            Subset(batches.dataset, items),
            batch_size=bs,
            shuffle=False,
            num_workers=batches.num_workers,
            collate_fn=batches.collate_fn,
            pin_memory=batches.pin_memory,
        )
        return loader, owned
    batches = list(batches)
    owned = mine(len(batches))
    return [batches[i] for i in owned], owned


def gather_batches(records: list, indices: list[int] | None) -> list:
    """Every process's per-batch records, in batch order (records as they are in one process)."""
    if indices is None:
        return records
    import torch.distributed as dist

    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, list(zip(indices, records)))
    return [r for _, r in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]


def check_identical(model: torch.nn.Module, what: str) -> None:
    """Raise unless every process holds bit-identical parameters and buffers."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list = [None] * size
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise DfqError(
            f"{what} differs between the {size} processes (a non-deterministic step).",
            "run in one process, and report this as a bug",
        )
