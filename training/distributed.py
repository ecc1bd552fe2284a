"""Where the job runs: one process, or DDP under torchrun; per-epoch seeding and the collective helpers.

The collectives are no-ops in a single process, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from training.config import ConfigError, TrainConfig


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    threads: int = 1  # torch intra-op threads of this process, as in force (recorded in the bundle)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} requested but CUDA is not available (torch {torch.__version__})")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    return torch.device("cpu")


def setup_runtime(config: TrainConfig) -> Runtime:
    """Single process, or DDP when launched by torchrun (RANK/WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", force=True)
    return Runtime(rank, world, device, torch.get_num_threads())


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed from (seed, epoch, rank) so epoch k's augmentation doesn't depend on earlier epochs."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def all_ranks(flag: bool, runtime: Runtime) -> bool:
    """True only when ``flag`` holds on every rank (one tiny all-reduce)."""
    value = torch.tensor([int(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(values)
    return values
