"""Recipe -> datasets -> DataLoaders. The only place that knows which recipe key feeds which reader."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from accel_det.config import Recipe

from .coco import COCODetection
from .collate import collate_fn
from .common import DetectionDataset
from .synthetic import is_complete, make_synthetic_voc
from .transforms import build_transforms
from .voc import VOCDetection
from .yolo import YOLODetection


def build_datasets(recipe: Recipe) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) datasets of ``recipe.data``, with training augments on train and the resize on both.

    ``data.root`` is relative to the working directory; the split keys are relative to ``data.root``
    (absolute paths work for all of them)."""
    data, model = recipe.data, recipe.model
    root = Path(data.root)
    names = data.class_names
    train_tf = build_transforms(True, model.img_dim, data.augments, channels=model.channels)
    val_tf = build_transforms(False, model.img_dim, [], channels=model.channels)
    fmt = data.format
    if fmt == "synthetic":
        if not is_complete(root, data.synthetic):
            make_synthetic_voc(root, data.synthetic, names)
        fmt = "voc"
    if fmt == "voc":
        return (
            VOCDetection(
                root, data.train, names, train_tf, keep_difficult=data.keep_difficult, channels=model.channels
            ),
            VOCDetection(root, data.val, names, val_tf, keep_difficult=True, channels=model.channels),
        )
    if fmt == "coco":
        # Crowd boxes are left out of training (torchvision's references do the same: a crowd box is one
        # box around many objects) but kept, flagged difficult, for the evaluator.
        return (
            COCODetection(
                root / data.train, root / data.train_images, names, train_tf, model.channels, keep_crowd=False
            ),
            COCODetection(
                root / data.val, root / data.val_images, names, val_tf, model.channels, keep_crowd=True
            ),
        )
    if fmt == "yolo":
        return (
            YOLODetection(root, data.train, names, train_tf, model.channels),
            YOLODetection(root, data.val, names, val_tf, model.channels),
        )
    raise ValueError(f"unknown data.format {data.format!r}")  # pragma: no cover - config validates it


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random from the worker's torch seed (the loader's generator + worker id).

    torch >= 1.9 does much the same on its own; stating it here keeps every worker's numpy/random draws
    distinct and reproducible from ``train.seed`` whatever the torch version or multiprocessing start
    method (forked workers otherwise all inherit the parent's numpy state)."""
    seed = torch.initial_seed() % 2**32
    # The loader's generator is seeded alike on every process (it must be: it is shared with the sampler),
    # so the workers of rank r > 0 would repeat rank 0's augmentation draws exactly. Mix the launcher's
    # rank in; rank 0 (and every 1-process run) keeps its seeds.
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:
        seed = (seed + 1_000_003 * rank) % 2**32
        torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(
    recipe: Recipe, train_ds: DetectionDataset, val_ds: DetectionDataset, seed: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """Plain DataLoaders; ``accelerator.prepare`` shards them across processes later. ``seed`` (default
    ``train.seed``) fixes the shuffle order of every epoch."""
    data = recipe.data
    seed = recipe.train.seed if seed is None else seed
    workers = data.num_workers
    common = dict(
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        drop_last=False,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    train_loader = DataLoader(
        train_ds, batch_size=data.batch_size, shuffle=True, generator=generator, **common
    )
    val_bs = recipe.eval.batch_size or data.batch_size
    val_loader = DataLoader(val_ds, batch_size=val_bs, shuffle=False, **common)
    return train_loader, val_loader
