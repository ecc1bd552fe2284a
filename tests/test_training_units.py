"""Pieces of the training job checked directly, without training a model: the learning-rate schedule, the
optimiser's parameter groups, resuming from an older checkpoint, --help, the threads rule, progress lines on a
fake clock, and the divergence checks (non-finite weights, a NaN on one DDP rank)."""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import run_cli

from training import train
from training.checkpoint import check_resumable
from training.loop import Diverged
from training.progress import EpochProgress


def test_schedule_warmup_then_cosine_or_steps() -> None:
    config = train.TrainConfig(data="", output="", epochs=10, warmup_epochs=2)
    factors = [train.lr_factor(step, 5, config) for step in range(50)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[30] == pytest.approx(0.5 * (1 + np.cos(np.pi * 20 / 40)))
    steps = train.TrainConfig(data="", output="", epochs=10, warmup_epochs=0, schedule="step")
    assert [train.lr_factor(s, 5, steps) for s in (0, 24, 25, 37, 38, 49)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    short = train.TrainConfig(data="", output="", epochs=3, warmup_epochs=5)  # warm-up capped at 1 of 3 epochs
    expected = [0.5, 1.0] + [0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    assert [train.lr_factor(s, 2, short) for s in range(6)] == pytest.approx(expected)


def test_resume_treats_options_missing_from_an_older_checkpoint_as_their_defaults() -> None:
    config = train.TrainConfig(data="d", output="o")
    old = {k: v for k, v in config.to_dict().items() if not k.startswith("head") and k != "grad_clip"}
    check_resumable({"config": {**old, "grad_clip": 0.0}, "class_names": ["a"]}, config, ["a"])  # no error
    with pytest.raises(train.ConfigError, match="--head 'softmax' \\(now 'arcface'\\)"):
        check_resumable({"config": old, "class_names": ["a"]}, train.TrainConfig("d", "o", head="arcface"), ["a"])


def test_centers_are_not_optimised_and_no_decay_on_1d_params() -> None:
    config = train.TrainConfig(data="", output="", arch="resnet18", width=4, image_size=(16, 16), feat_dim=8)
    runtime = train.Runtime(rank=0, world=1, device=torch.device("cpu"))
    trainer = train.build_trainer(config, runtime, num_classes=5, steps_per_epoch=3)
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    centers = trainer.center_loss.centers
    assert all(p.data_ptr() != centers.data_ptr() for p in optimised) and not centers.requires_grad
    assert "centers" in trainer.center_loss.state_dict() and not list(trainer.center_loss.parameters())
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == config.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(optimised) == len(list(trainer.net.parameters()))


def test_help_shows_every_options_default() -> None:
    parser = train.build_parser()
    text = parser.format_help().split("options:\n", 1)[1]
    blocks = {block.split()[0].rstrip(","): " ".join(block.split()) for block in re.split(r"\n(?=  -)", text)}
    options = [a for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS]
    assert len(options) > 30 and len(blocks) == len(options) + 1  # + --help
    for action in options:
        block = blocks[action.option_strings[0]]
        assert action.required or "(default: " in block, block


def test_threads_default_follows_the_measured_rule() -> None:
    runtime = train.setup_runtime(train.TrainConfig(data="", output="", device="cpu"))
    usable = len(os.sched_getaffinity(0))
    assert runtime.threads == torch.get_num_threads() and (runtime.threads == 1 or usable > 2)


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_are_timed_by_the_clock_and_a_terminal_gets_a_bar(caplog) -> None:
    """Epoch 2 of 3, 10 steps of 32 images, 2 s per step on a fake clock, a line due every 5 s."""
    now = [100.0]
    progress = EpochProgress(1, 3, 10, every_s=5, stream=FakeStream(tty=False), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="training"):
        for step in range(1, 11):
            now[0] += 2
            progress.update(step, 32 * step, lambda: {"loss": "1.000"})
    lines = [r.getMessage() for r in caplog.records]
    # due at t = 6, 12, 18 s (steps 3, 6, 9); ETA: 2 s × steps left, plus 10 steps × 2 s for epoch 3
    assert lines == [
        f"epoch 2/3  step {k}/10 ({10 * k}%)  16 img/s  ETA epoch 0:{2 * (10 - k):02d}  run 0:{20 + 2 * (10 - k):02d}"
        "  loss 1.000"
        for k in (3, 6, 9)
    ]
    caplog.clear()
    terminal = FakeStream(tty=True)
    bar = EpochProgress(0, 1, 4, every_s=0, stream=terminal)
    with caplog.at_level(logging.INFO, logger="training"):
        for step in range(1, 5):
            bar.update(step, 32 * step, lambda: {"loss": "1.000"})
    assert bar.bar is not None and bar.bar.n == 4  # a tqdm bar counted every step
    bar.close()
    assert not caplog.records and "epoch 1/1" in terminal.getvalue()
    quiet = FakeStream(tty=False)
    EpochProgress(0, 1, 4, every_s=0, enabled=False, stream=quiet).update(1, 32, lambda: {})  # rank > 0
    assert quiet.getvalue() == ""


def test_non_finite_weights_after_the_last_step_are_refused() -> None:
    """A last step can overflow the weights with a finite loss: the check names the tensor and the hints."""
    config = train.TrainConfig(data="", output="", arch="resnet18", width=4, image_size=(16, 16), feat_dim=8)
    trainer = train.build_trainer(config, train.Runtime(0, 1, torch.device("cpu")), num_classes=5, steps_per_epoch=3)
    trainer.check_finite_weights()  # fresh weights: fine
    running_var = next(k for k in trainer.embed.state_dict() if k.endswith("running_var"))
    trainer.embed.state_dict()[running_var][0] = float("inf")  # a batch-norm statistic, not a parameter
    with pytest.raises(Diverged, match=f"non-finite weights after the last step \\({re.escape(running_var)}\\)"):
        trainer.check_finite_weights()


RANK_SCRIPT = """
import math, sys, torch
from training.config import TrainConfig
from training.distributed import setup_runtime
from training.loop import Diverged, build_trainer
config = TrainConfig(data="", output="", arch="lenetpp", feat_dim=2, image_size=(16, 16), device="cpu")
runtime = setup_runtime(config)
trainer = build_trainer(config, runtime, num_classes=3, steps_per_epoch=4)
trainer.stop_if_diverged(torch.tensor(1.0), 0, 0, 4)  # finite everywhere: no stop
loss = torch.tensor(math.nan if runtime.rank == 1 else 2.5)  # only rank 1 sees the NaN
try:
    trainer.stop_if_diverged(loss, 0, 1, 4)
except Diverged as error:
    print(f"rank {runtime.rank} stopped: {error}", flush=True)
    torch.distributed.destroy_process_group()
    sys.exit(1)
print(f"rank {runtime.rank} went on", flush=True)
"""


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    result = run_cli("--standalone", "--nproc_per_node=2", str(script), module="torch.distributed.run", timeout=120)
    assert result.returncode != 0
    assert "went on" not in result.stdout
    assert "rank 1 stopped: training diverged: the loss is nan at epoch 1/20, step 2/4" in result.stdout
    assert "rank 0 stopped: training diverged: another process's loss is not finite" in result.stdout
