"""Train an embedding network with a softmax, CosFace or ArcFace head + λ·center loss and write a calibrated bundle.

    python -m training --data data/orl --output bundles/orl --holdout-identities 10
    torchrun --nproc_per_node=2 -m training --data ... --output ...      # DDP (nccl on CUDA, gloo on CPU)

One epoch = one pass over the training identities' images; after each, rank 0 appends a line to
``OUTPUT/metrics.jsonl`` and atomically rewrites ``OUTPUT/checkpoints/last.pt``. The RNG is reseeded
from (seed, epoch, rank) at every epoch start, so ``--resume`` reproduces an uninterrupted run exactly.
At the end, rank 0 evaluates on the held-out images (see :mod:`training.evaluate`), calibrates the
verification threshold at ``--target-far`` on held-out identity pairs, draws the plots and writes the
bundle around the by-products.

This module is the job read top to bottom; the parts live beside it: :mod:`training.config` (options),
:mod:`training.distributed` (DDP runtime), :mod:`training.checkpoint`, :mod:`training.loop` (model,
optimizer, schedule, one epoch) and :mod:`training.publish` (evaluation, plots, bundle).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from training.bundle import BundleError
from training.calibration import default_holdout
from training.checkpoint import CHECKPOINT_DIR, check_resumable, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, build_parser, parse_config, validate
from training.data import (
    DataError,
    ImageDataset,
    Split,
    make_loader,
    scan_image_folder,
    split_identities,
    with_test_folder,
)
from training.distributed import Runtime, seed_epoch, setup_runtime
from training.loop import Diverged, Trainer, build_embed, build_trainer, lr_factor
from training.preprocess import InputSpec, Preprocessor
from training.publish import finish

ALIGNMENT_RECORD = "alignment.json"  # written by training.align beside its crops

# re-exported: the names tests, the demo and scripts have always imported from here
__all__ = ["ConfigError", "Runtime", "TrainConfig", "build_embed", "build_parser", "build_trainer", "lr_factor",
           "main", "parse_config", "train"]  # fmt: skip

log = logging.getLogger("training")

METRICS_FILE = "metrics.jsonl"


def check_batch_size(images: int, config: TrainConfig, runtime: Runtime) -> None:
    if config.batch_size > images // runtime.world:
        per_rank = images // runtime.world
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {per_rank} training images per process")


def load_data(config: TrainConfig, runtime: Runtime) -> tuple[Split, Preprocessor, ImageDataset]:
    folder = scan_image_folder(config.data)
    holdout = config.holdout_identities
    if holdout == "auto":
        holdout = default_holdout(len(folder.class_names))
    split = split_identities(folder, holdout, config.test_fraction, config.seed)  # type: ignore[arg-type]
    if config.test_data:
        unused = len(split.test)
        split = with_test_folder(split, scan_image_folder(config.test_data))
        if unused:
            log.warning("%d --test-fraction images are neither trained on nor evaluated with --test-data "
                        "(pass --test-fraction 0 to train on them)", unused)  # fmt: skip
    check_batch_size(len(split.train), config, runtime)  # before decoding anything
    preprocess = Preprocessor(input_spec(config), hflip=config.hflip)
    cache = {"auto": None, "on": True, "off": False}[config.cache]
    train_set = ImageDataset(split.train, preprocess, train=True, cache=cache)
    if train_set.skipped:
        log.info("skipped %d unreadable training image(s)", train_set.skipped)
    return split, preprocess, train_set


def input_spec(config: TrainConfig) -> InputSpec:
    """What the network takes. A folder written by ``python -m training.align`` says in its alignment.json how
    its crops were aligned: the bundle records that, so the service detects and aligns uploads the same way."""
    spec = InputSpec(channels=config.channels, height=config.image_size[0], width=config.image_size[1])
    record = Path(config.data) / ALIGNMENT_RECORD
    if not record.is_file():
        return spec
    try:
        aligned = InputSpec.from_dict(json.loads(record.read_text())["input"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{record}: not an alignment record of training.align ({error})") from None
    if (aligned.height, aligned.width) != (spec.height, spec.width):
        raise ConfigError(
            f"--image-size {spec.height} {spec.width} differs from the {aligned.height}x{aligned.width} crops "
            f"{record} describes: pass --image-size {aligned.height} {aligned.width}"
        )
    log.info("crops aligned by training.align (%s): the bundle will align uploads the same way", record)
    return dataclasses.replace(spec, align=aligned.align, template=aligned.template)


def train(config: TrainConfig) -> Path | None:
    """The whole job; returns the bundle path on rank 0 (None on other ranks)."""
    validate(config)
    runtime = setup_runtime(config)
    try:
        return _train(config, runtime)
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _loader(train_set: ImageDataset, config: TrainConfig, runtime: Runtime, epoch: int) -> Any:
    return make_loader(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=config.workers,
        distributed=runtime.distributed,
        drop_last=True,
        epoch=epoch,
    )


def _train(config: TrainConfig, runtime: Runtime) -> Path | None:
    output = Path(config.output)
    split, preprocess, train_set = load_data(config, runtime)
    check_batch_size(len(train_set), config, runtime)  # again, without the unreadable files
    steps_per_epoch = len(_loader(train_set, config, runtime, 0))
    trainer = build_trainer(config, runtime, len(split.train_classes), steps_per_epoch)
    start_epoch, history = 0, []
    if config.resume:
        checkpoint = load_checkpoint(config.resume)
        check_resumable(checkpoint, config, split.train_classes)
        if checkpoint.get("world_size") != runtime.world:
            log.warning(
                "resuming a %s-process run with %d processes: not bit-exact",
                checkpoint.get("world_size"),
                runtime.world,
            )
        trainer.load(checkpoint)
        start_epoch, history = int(checkpoint["epoch"]), list(checkpoint["history"])
    summary = split.summary()
    log.info(
        "training %s (%s head, λ=%g) on %d images of %d identities (%d test images, %d held-out identities),"
        " %d process(es) on %s, %d thread(s) each",
        config.arch,
        config.head,
        config.center_weight,
        len(train_set),
        summary["train_identities"],
        summary["test_images"],
        summary["holdout_identities"],
        runtime.world,
        runtime.device,
        runtime.threads,
    )
    if runtime.is_main:
        _start_outputs(output, history, fresh=not config.resume)
    for epoch in range(start_epoch, config.epochs):
        seed_epoch(config.seed, epoch, runtime.rank)
        record = trainer.train_epoch(_loader(train_set, config, runtime, epoch), epoch)
        history.append(record)
        if runtime.is_main:
            _end_epoch(output, trainer, record, split.train_classes, history)
    if runtime.distributed:
        dist.barrier()
    if not runtime.is_main:
        return None
    trainer.check_finite_weights()
    return finish(config, trainer, split, preprocess, train_set.skipped, history)


def _start_outputs(output: Path, history: list[dict[str, Any]], fresh: bool) -> None:
    """(Re)write metrics.jsonl from the resumed history; drop stale per-epoch checkpoints of an old run."""
    (output / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    if fresh:
        for stale in (output / CHECKPOINT_DIR).glob("epoch_*.pt"):
            stale.unlink()
    with (output / METRICS_FILE).open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)


def _end_epoch(
    output: Path, trainer: Trainer, record: dict[str, Any], class_names: list[str], history: list[dict[str, Any]]
) -> None:
    with (output / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    state = trainer.state(record["epoch"], class_names, history)
    save_checkpoint(output / CHECKPOINT_DIR / "last.pt", state)
    if trainer.config.keep_checkpoints:
        save_checkpoint(output / CHECKPOINT_DIR / f"epoch_{record['epoch']:03d}.pt", state)
    log.info(
        "epoch %d/%d  lr %.4g  loss %.4f  softmax %.4f  center %.4f  acc %.4f  %.0f img/s  |x| %.2f  |c| %.2f",
        record["epoch"],
        trainer.config.epochs,
        record["lr"],
        record["loss"],
        record["softmax_loss"],
        record["center_loss"],
        record["train_accuracy"],
        record["images_per_s"],
        record["feature_norm"],
        record["center_norm"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except (ConfigError, DataError, BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:  # every rank raises it together; one message is enough
        if os.environ.get("RANK", "0") == "0":
            earlier = (Path(config.output) / "bundle.json").is_file()
            note = f" (the bundle already in {config.output} is an earlier run's, left as it was)" if earlier else ""
            print(f"error: {error}{note}", file=sys.stderr)
        return 1
    return 0
