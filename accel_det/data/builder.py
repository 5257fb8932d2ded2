"""Recipe -> datasets -> DataLoaders. The only place that knows which recipe key feeds which reader."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from accel_det.config import Recipe

from .coco import COCODetection
from .collate import collate_fn
from .dataset import DetectionDataset, OnBadSample
from .synthetic import make_synthetic_voc
from .transforms import build_transforms
from .voc import VOCDetection
from .yolo import YOLODetection


def _root(recipe: Recipe) -> tuple[Path, str]:
    """The folder the split paths are relative to, and the reader format (a synthetic set is a VOC folder,
    generated on first use)."""
    data = recipe.data
    root = Path(data.root)
    if data.format == "synthetic":
        # one folder per synthetic config under data.root: a run never replaces another run's images
        return make_synthetic_voc(root, data.synthetic, data.class_names), "voc"
    return root, data.format


def eval_transforms(recipe: Recipe) -> v2.Compose:
    """What evaluation, ``evaluate`` and ``predict`` apply to an image: the resize to ``img_dim``, nothing
    random."""
    return build_transforms(False, recipe.model.img_dim, [], channels=recipe.model.channels)


def build_dataset(recipe: Recipe, split: Literal["train", "val"]) -> DetectionDataset:
    """One split of ``recipe.data``: training augments on train, the resize on both.

    ``data.root`` is relative to the working directory; the split keys are relative to ``data.root``
    (absolute paths work for all of them). Only the asked split is indexed: ``evaluate`` must work when the
    training files are gone.

    ``data.on_bad_sample = "skip"`` replaces an unreadable training sample by another; on val it becomes
    "blank" (an unreadable image is scored as missing, not swapped for another image's ground truth)."""
    data, model = recipe.data, recipe.model
    root, fmt = _root(recipe)
    names = data.class_names
    train = split == "train"
    tf = build_transforms(True, model.img_dim, data.augments, channels=model.channels) if train else (
        eval_transforms(recipe))
    where = data.train if train else data.val
    policy: OnBadSample = data.on_bad_sample if train or data.on_bad_sample == "error" else "blank"
    common: dict[str, Any] = dict(on_bad_sample=policy, seed=recipe.train.seed)
    if fmt == "voc":
        # validation keeps difficult boxes, flagged, for the evaluator to ignore
        keep = data.keep_difficult if train else True
        return VOCDetection(root, where, names, tf, keep_difficult=keep, channels=model.channels,
                            ignore_classes=data.ignore_classes, **common)  # fmt: skip
    if fmt == "coco":
        # Crowd boxes are left out of training (torchvision's references do the same: a crowd box is one
        # box around many objects) but kept, flagged difficult, for the evaluator.
        images = data.train_images if train else data.val_images
        return COCODetection(root / where, root / images, names, tf, model.channels, keep_crowd=not train,
                             ignore_classes=data.ignore_classes, **common)  # fmt: skip
    if fmt == "yolo":
        return YOLODetection(root, where, names, tf, model.channels, **common)
    raise ValueError(f"unknown data.format {data.format!r}")  # pragma: no cover - config validates it


def build_datasets(recipe: Recipe) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) datasets of ``recipe.data``."""
    return build_dataset(recipe, "train"), build_dataset(recipe, "val")


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (the name is historical): workers ignore SIGINT and SIGTERM.

    Ctrl-C in a terminal and SLURM's SIGTERM go to the whole process group. The main process handles them
    (it finishes the step, saves a checkpoint and shuts its workers down); a worker they killed first would
    make it fail with "DataLoader worker exited unexpectedly" instead. A worker whose main process dies
    anyway exits by itself (torch's watchdog checks the parent).

    Nothing is seeded here: augmentations draw from a generator seeded per sample (dataset.py), and torch
    seeds each worker's torch, numpy and ``random`` on its own. (Until that change, this mixed the
    launcher's rank into the worker seeds, because the worker streams drove the augmentations.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit. Workers ignore SIGTERM (above), and that is how multiprocessing's own exit hook stops the
    daemon workers it still finds alive (a loader whose iterator is still referenced, e.g. after an error):
    it would wait for them forever. This hook runs first (atexit is last-in first-out) and kills them."""
    children = multiprocessing.active_children()
    if not children:
        return
    # torch's SIGCHLD handler raises in the main process when a worker dies: we are the ones killing them
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def _loader_kwargs(recipe: Recipe) -> dict[str, Any]:
    workers = recipe.data.num_workers
    if workers > 0:
        atexit.unregister(_kill_leftover_workers)  # once, and after multiprocessing's hook
        atexit.register(_kill_leftover_workers)
    return dict(
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
    )


def build_train_loader(recipe: Recipe, dataset: DetectionDataset, seed: int | None = None) -> DataLoader:
    """Shuffled batches of ``data.batch_size``; ``seed`` (default ``train.seed``) fixes every epoch's order.

    The incomplete last batch is dropped (torchvision's references do the same): a batch of one image
    breaks BatchNorm in train mode ("Expected more than 1 value per channel"), and a small last batch
    would weigh its few images like a full one. Shuffling moves different images into the dropped tail
    each epoch, so none is left out for good."""
    generator = torch.Generator()
    generator.manual_seed(recipe.train.seed if seed is None else seed)
    return DataLoader(dataset, batch_size=recipe.data.batch_size, shuffle=True, generator=generator,
                      drop_last=True, **_loader_kwargs(recipe))


def build_val_loader(recipe: Recipe, dataset: DetectionDataset) -> DataLoader:
    """Every val image exactly once, in order (the evaluator must score them all)."""
    return DataLoader(dataset, batch_size=recipe.eval.batch_size or recipe.data.batch_size, shuffle=False,
                      drop_last=False, **_loader_kwargs(recipe))


def build_loaders(
    recipe: Recipe, train_ds: DetectionDataset, val_ds: DetectionDataset, seed: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """Plain DataLoaders; ``accelerator.prepare`` shards them across processes later."""
    return build_train_loader(recipe, train_ds, seed), build_val_loader(recipe, val_ds)
