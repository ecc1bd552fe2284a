"""training.center_loss inside training: the global Eq. 4 update under DDP (2 gloo processes on CPU, checked
against the single-process reference on the union batch) and joint softmax + center-loss training making
classes more compact than softmax alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from center_loss_support import make_loss, ref_update
from torch import nn

from training.center_loss import CenterLoss

# ---------------------------------------------------------------- DDP (2 gloo processes on CPU)
DDP_SPLIT = 5  # rank 0 gets 5 rows, rank 1 gets 3: different batch sizes


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8, 6, generator=g)
    y = torch.tensor([0, 2, 2, 1, 4, 2, 1, 3])  # classes 1 and 2 on both ranks: n_j is global
    c0 = torch.randn(5, 3, generator=g)
    return x, y, c0


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y, c0 = _ddp_data()
        rows = slice(0, DDP_SPLIT) if rank == 0 else slice(DDP_SPLIT, None)
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
        model = nn.parallel.DistributedDataParallel(nn.Linear(6, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cl = make_loss(c0 + rank)  # rank 1 starts off: the first update must adopt rank 0's centers
        out = {"weight0": model.module.weight.detach().clone()}
        for step in range(2):
            opt.zero_grad()
            loss = cl(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
            out[f"centers{step}"] = cl.centers.clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_global_update_identical_on_all_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # containers: the hostname may not resolve to loopback
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["weight0"], r1["weight0"])
    for step in range(2):
        assert torch.equal(r0[f"centers{step}"], r1[f"centers{step}"])  # bit-identical across ranks

    x, y, c0 = _ddp_data()
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.copy_(r0["weight0"])
        torch.manual_seed(0)
        lin.bias.copy_(nn.Linear(6, 3).bias)  # rank 0's init (seed 0), broadcast by DDP
        f = lin(x).numpy()
    global_ref = ref_update(f, y.numpy(), c0.numpy(), 0.5)  # single-process Eq. 4 on the union batch
    np.testing.assert_allclose(r0["centers0"].numpy(), global_ref, rtol=1e-5, atol=1e-6)
    local_ref = ref_update(f[:DDP_SPLIT], y[:DDP_SPLIT].numpy(), c0.numpy(), 0.5)
    assert not np.allclose(r0["centers0"].numpy(), local_ref, atol=1e-3)  # a local update would differ


# ---------------------------------------------------------------- end to end
def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 10, generator=torch.Generator().manual_seed(7)) * 2.5
    y = torch.randint(0, 5, (n,), generator=g)
    return means[y] + torch.randn(n, 10, generator=g), y


EPOCHS = 20


def _train(lam: float) -> float:
    """Softmax (+ λ·center loss) on Gaussian blobs with a 2-D embedding; returns held-out
    mean intra-class distance / mean inter-center distance (scale-free compactness)."""
    torch.manual_seed(0)
    embed = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    head = nn.Linear(2, 5)
    cl = CenterLoss(5, 2)
    opt = torch.optim.SGD([*embed.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    x, y = _blobs(2048, seed=1)
    for _ in range(EPOCHS):
        for i in range(0, len(y), 64):
            f = embed(x[i : i + 64])
            loss = F.cross_entropy(head(f), y[i : i + 64])
            if lam:
                loss = loss + lam * cl(f, y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = _blobs(1000, seed=2)
    with torch.no_grad():
        f = embed(xt)
        assert (head(f).argmax(1) == yt).float().mean() > 0.95
    mu = torch.stack([f[yt == k].mean(0) for k in range(5)])
    intra = (f - mu[yt]).norm(dim=1).mean()
    inter = torch.pdist(mu).mean()
    return float(intra / inter)


def test_joint_training_makes_classes_more_compact() -> None:
    torch.set_num_threads(1)
    softmax_only = _train(lam=0.0)
    joint = _train(lam=0.3)
    assert joint < 0.5 * softmax_only, (joint, softmax_only)
