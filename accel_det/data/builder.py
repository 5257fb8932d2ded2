"""Recipe -> datasets -> DataLoaders. The only place that knows which recipe key feeds which reader."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from accel_det.config import Recipe

from .coco import COCODetection
from .collate import collate_fn
from .dataset import DetectionDataset, OnBadSample, StagedTransforms, Transforms
from .mix import MixedDataset, MixSampler, second_set_seed
from .synthetic import make_synthetic_voc
from .transforms import build_transforms
from .voc import VOCDetection
from .yolo import YOLODetection

Split = Literal["train", "val", "train2", "val2"]


@dataclass(frozen=True)
class _Source:
    """Where one dataset of the recipe lives: ``[data]``, or ``[data.mix]`` (its keys resolved by config)."""

    format: str
    root: Path
    train: str
    val: str
    train_images: str
    val_images: str


def _source(recipe: Recipe, second: bool) -> _Source:
    """The folder the split paths are relative to, the reader format (a synthetic set is a VOC folder, generated
    on first use) and the split keys, of the first set or of the mixed-in second one."""
    data = recipe.data
    where: Any = data.mix if second else data
    if where is None:
        raise ValueError("the splits 'train2' and 'val2' need [data.mix] in the recipe")
    root, fmt = Path(where.root), where.format
    if fmt == "synthetic":
        # one folder per synthetic config under the root: a run never replaces another run's images
        root, fmt = make_synthetic_voc(root, data.synthetic, data.class_names), "voc"
    return _Source(fmt, root, where.train, where.val, where.train_images, where.val_images)


def train_transforms(recipe: Recipe) -> Transforms | StagedTransforms:
    """The training pipeline: ``data.augments`` throughout, or one pipeline per ``[[data.stages]]`` entry
    (the dataset picks it by epoch: dataset.py)."""
    data, model = recipe.data, recipe.model

    def pipeline(augments: Sequence[str]) -> Transforms:
        return build_transforms(True, model.img_dim, augments, channels=model.channels, letterbox=data.letterbox)

    if not data.stages:
        return pipeline(data.augments)
    return StagedTransforms(data.stage_starts(), [pipeline(stage.augments or []) for stage in data.stages])


def eval_transforms(recipe: Recipe) -> v2.Compose:
    """What evaluation, ``evaluate`` and ``predict`` apply to an image: to the ``img_dim`` square (stretched, or
    letterboxed with ``data.letterbox``; ``transforms.to_original`` maps boxes back), nothing random."""
    return build_transforms(False, recipe.model.img_dim, [], channels=recipe.model.channels,
                            letterbox=recipe.data.letterbox)


def eval_splits(recipe: Recipe) -> list[Literal["val", "val2"]]:
    """The validation splits to evaluate and report separately: "val", and "val2" with ``[data.mix]``."""
    return ["val", "val2"] if recipe.data.mix is not None else ["val"]


@overload
def build_dataset(recipe: Recipe, split: Literal["val", "train2", "val2"]) -> DetectionDataset: ...
@overload
def build_dataset(recipe: Recipe, split: Split) -> DetectionDataset | MixedDataset: ...
def build_dataset(recipe: Recipe, split: Split) -> DetectionDataset | MixedDataset:
    """One split of the recipe: "train" and "val" of ``[data]``, "train2" and "val2" of ``[data.mix]``.
    With ``[data.mix]``, "train" is the ``MixedDataset`` of "train" and "train2" (draw it with the loader of
    ``build_train_loader``: ``MixSampler``).

    ``data.root`` is relative to the working directory; the split keys are relative to ``data.root``
    (absolute paths work for all of them). Only the asked split is indexed: ``evaluate`` must work when the
    training files are gone.

    ``data.on_bad_sample = "skip"`` replaces an unreadable training sample by another; on val it becomes
    "blank" (an unreadable image is scored as missing, not swapped for another image's ground truth).
    ``data.single_cls``: read and checked with ``data.class_names``, then every label is 1."""
    if split == "train" and recipe.data.mix is not None:
        return MixedDataset(_read(recipe, "train"), _read(recipe, "train2"))
    return _read(recipe, split)


def _read(recipe: Recipe, split: Split) -> DetectionDataset:
    data, model = recipe.data, recipe.model
    second = split.endswith("2")
    src = _source(recipe, second)
    names = data.class_names
    train = split.startswith("train")
    tf = train_transforms(recipe) if train else eval_transforms(recipe)
    where = src.train if train else src.val
    policy: OnBadSample = data.on_bad_sample if train or data.on_bad_sample == "error" else "blank"
    seed = second_set_seed(recipe.train.seed) if second else recipe.train.seed
    common: dict[str, Any] = dict(on_bad_sample=policy, seed=seed)
    ds: DetectionDataset
    if src.format == "voc":
        # validation keeps difficult boxes, flagged, for the evaluator to ignore
        keep = data.keep_difficult if train else True
        ds = VOCDetection(src.root, where, names, tf, keep_difficult=keep, channels=model.channels,
                          ignore_classes=data.ignore_classes, **common)  # fmt: skip
    elif src.format == "coco":
        # Crowd boxes are left out of training (torchvision's references do the same: a crowd box is one
        # box around many objects) but kept, flagged difficult, for the evaluator.
        images = src.train_images if train else src.val_images
        ds = COCODetection(src.root / where, src.root / images, names, tf, model.channels, keep_crowd=not train,
                           ignore_classes=data.ignore_classes, **common)  # fmt: skip
    elif src.format == "yolo":
        ds = YOLODetection(src.root, where, names, tf, model.channels, **common)
    elif src.format == "hf":  # crowd boxes as for coco; imported here: pyarrow comes with the optional datasets
        from .hf import HFDetection

        ds = HFDetection(src.root, where, names, tf, model.channels, keep_crowd=not train,
                         ignore_classes=data.ignore_classes, **common)  # fmt: skip
    else:  # pragma: no cover - config validates it
        raise ValueError(f"unknown data.format {src.format!r}")
    if data.single_cls:
        ds.merge_classes(data.single_cls_name)
    return ds


def build_datasets(recipe: Recipe) -> tuple[DetectionDataset | MixedDataset, DetectionDataset]:
    """(train, val) datasets of ``recipe.data`` (train mixed with ``[data.mix]``'s when set)."""
    return build_dataset(recipe, "train"), build_dataset(recipe, "val")


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM.

    Ctrl-C in a terminal and SLURM's SIGTERM go to the whole process group. The main process handles them
    (it finishes the step, saves a checkpoint and shuts its workers down); a worker they killed first would
    make it fail with "DataLoader worker exited unexpectedly" instead. A worker whose main process dies
    anyway exits by itself (torch's watchdog checks the parent). Nothing needs seeding here: augmentations
    draw from a generator seeded per sample (dataset.py)."""
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
        worker_init_fn=worker_init,
    )


def build_train_loader(
    recipe: Recipe, dataset: DetectionDataset | MixedDataset, seed: int | None = None
) -> DataLoader:
    """Shuffled batches of ``data.batch_size``; ``seed`` (default ``train.seed``) fixes every epoch's order. A
    ``MixedDataset`` is drawn by a ``MixSampler`` instead of the shuffle (its epoch length: mix.py); call the
    prepared loader's ``set_epoch`` before each epoch either way (accelerate passes it on to the sampler).

    The incomplete last batch is dropped (torchvision's references do the same): a batch of one image
    breaks BatchNorm in train mode ("Expected more than 1 value per channel"), and a small last batch
    would weigh its few images like a full one. Shuffling moves different images into the dropped tail
    each epoch, so none is left out for good."""
    seed = recipe.train.seed if seed is None else seed
    batch_size = recipe.data.batch_size
    if isinstance(dataset, MixedDataset):
        if recipe.data.mix is None:
            raise ValueError("a MixedDataset needs [data.mix] in the recipe (its rate)")
        sampler = MixSampler(dataset.sizes, recipe.data.mix.rate, seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **_loader_kwargs(recipe))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      drop_last=True, **_loader_kwargs(recipe))


def build_val_loader(recipe: Recipe, dataset: DetectionDataset) -> DataLoader:
    """Every val image exactly once, in order (the evaluator must score them all)."""
    return DataLoader(dataset, batch_size=recipe.eval.batch_size or recipe.data.batch_size, shuffle=False,
                      drop_last=False, **_loader_kwargs(recipe))


def build_loaders(
    recipe: Recipe, train_ds: DetectionDataset | MixedDataset, val_ds: DetectionDataset, seed: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """Plain DataLoaders; ``accelerator.prepare`` shards them across processes later."""
    return build_train_loader(recipe, train_ds, seed), build_val_loader(recipe, val_ds)
