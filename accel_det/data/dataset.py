"""``DetectionDataset``: the base of every reader, and the one place the sample contract lives
(docs/architecture.md, Contracts).

Randomness. A sample's augmentation draw is a pure function of (``seed``, epoch, index): ``__getitem__`` runs
the transforms on torch's global CPU generator (what ``torchvision.transforms.v2`` draws from; none of the
transforms built in transforms.py use ``random`` or numpy) reseeded from those three, and restores the
generator afterwards. So the draw does not depend on which worker or process loads the sample, nor on what
that worker loaded before: 0, 1 or N workers, any number of processes and a resume mid-epoch all see the same
pixels. The epoch lives in a shared-memory tensor so that ``set_epoch`` in the main process reaches
DataLoader workers that already exist (``persistent_workers``).

Stages (``[[data.stages]]``). ``transforms`` may be a ``StagedTransforms``: one pipeline per stage, picked by
that same shared epoch at every ``__getitem__``. So every worker of every process switches exactly at the stage
boundary (and a resume lands in the right stage) without rebuilding the DataLoader: rebuilding would restart
persistent workers and have to re-create what ``accelerator.prepare`` wrapped around the loader.

Mosaic. A pipeline (or a stage's) that is a ``mosaic.Mosaic`` gets sample i plus three partners that it draws,
inside the same seeded generator, from this dataset (``_partner``: loaded, not transformed); so a stage without
mosaic gives plain samples, and validation, evaluation, predict and the data doctor, which never build a training
pipeline, never mosaic.

Bad samples. ``on_bad_sample`` says what a sample that fails to load does:

- ``"error"``: raises its ``DataError`` (``local``: only the process that read it knows);
- ``"skip"`` (training): the next index that loads (wrapping around) stands in, deterministically so that a
  resume sees the same batch; its target carries ``"replaced": [the failure's one-line message]``;
- ``"blank"`` (validation): a blank 1x1 image, resized like any other, with no boxes and
  ``target["unreadable"] = True``, so the evaluator can leave it out of the metric and count it.

At index time "skip" and "blank" drop what is wrong with one image or object and list it in ``problems``
(common.py); "error" raises the first such problem.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import (
    IMAGE_DROPPED,
    BadEntry,
    DatasetError,
    Problem,
    Record,
    UnknownNames,
    class_list,
    fatal,
    first_few,
    summarize,
)
from .images import load_image
from .mosaic import Mosaic

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]]
OnBadSample = Literal["skip", "error", "blank"]
ON_BAD_SAMPLE = ("skip", "error", "blank")

_MASK64 = 2**64 - 1


class StagedTransforms:
    """One training pipeline per stage: ``pipelines[i]`` from epoch ``starts[i]`` (0-based, increasing, the
    first 0) until the next start; the last runs on (``DataConfig.stage_of`` is the same rule)."""

    def __init__(self, starts: Sequence[int], pipelines: Sequence[Transforms]) -> None:
        if not pipelines or len(starts) != len(pipelines) or starts[0] != 0 or list(starts) != sorted(starts):
            raise ValueError(f"stage starts {list(starts)} do not fit {len(pipelines)} pipelines")
        # in shared memory, as the epoch: a time budget moves the stages while persistent workers run
        self.starts = torch.tensor(list(starts), dtype=torch.int64).share_memory_()
        self.pipelines = list(pipelines)

    def set_starts(self, starts: Sequence[int]) -> None:
        """New stage starts (engine/budget.py); call it before the epoch's iterator is made, as set_epoch."""
        if len(starts) != len(self.pipelines) or starts[0] != 0 or list(starts) != sorted(starts):
            raise ValueError(f"stage starts {list(starts)} do not fit {len(self.pipelines)} pipelines")
        self.starts[:] = torch.tensor(list(starts), dtype=torch.int64)

    def at(self, epoch: int) -> Transforms:
        return self.pipelines[max(bisect_right(self.starts.tolist(), epoch) - 1, 0)]


def _splitmix64(x: int) -> int:
    # Steele et al.'s SplitMix64 finaliser: neighbouring inputs (index 7 vs 8) give unrelated 64-bit outputs,
    # so the per-sample generators do not start in correlated states.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s augmentations in ``epoch`` of a run seeded ``seed``."""
    h = 0
    for value in (seed, epoch, index):
        h = _splitmix64(h ^ (value & _MASK64))
    return h


class DetectionDataset(Dataset):
    """Base of the readers: subclasses fill ``records``, ``class_names`` and ``category_ids``, call
    ``drop``/``note`` for what they leave out, and ``finish_index`` at the end of their constructor.

    ``seed``: ``train.seed`` (the builder sets it); ``ignore_classes``: class names whose objects are dropped
    (VOC, COCO; each drop is a ``Problem`` of kind "ignored_class"); ``transforms``: one pipeline, or one per
    stage (``StagedTransforms``)."""

    def __init__(
        self,
        class_names: Sequence[str],
        transforms: Transforms | StagedTransforms | None,
        channels: int,
        keep_difficult: bool = True,
        *,
        on_bad_sample: OnBadSample = "error",
        ignore_classes: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        if channels not in (1, 3):
            raise DatasetError(f"model.channels = {channels}: datasets load 1- or 3-channel images only")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, got {on_bad_sample!r}")
        both = [n for n in ignore_classes if n in class_names]
        if both:
            raise DatasetError(f"data.ignore_classes and data.class_names both name {', '.join(both)}")
        self.class_names: list[str] = list(class_names)
        self.ignore_classes: frozenset[str] = frozenset(ignore_classes)
        self.category_ids: list[int] = []
        self.records: list[Record] = []
        self.transforms = transforms
        self.channels = channels
        self.on_bad_sample: OnBadSample = on_bad_sample
        self.seed = seed
        self.source = type(self).__name__  # what messages name for the whole split; readers set the path
        # One int64 in shared memory: workers (forked or spawned, persistent or not) read the value the main
        # process last wrote with set_epoch, instead of the copy they were started with.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # One-line messages about the data that do not stop training; the engine logs them once per run.
        self.warnings: list[str] = []
        # What the reader dropped or found odd, one entry per image/object (common.PROBLEM_KINDS).
        self.problems: list[Problem] = []
        self.unknown = UnknownNames()
        # False drops difficult (VOC) / crowd (COCO) boxes: training on them teaches the model to fire on
        # things the evaluator ignores.
        self.keep_difficult = keep_difficult

    # -- index time ------------------------------------------------------------------------------------------

    def drop(self, exc: BadEntry, action: str) -> None:
        """Leave out what ``exc`` is about (``action`` says what): raise it in "error" mode, else record it."""
        if self.on_bad_sample == "error":
            raise exc
        self.problems.append(exc.problem(action))

    def note(self, kind: str, file: str | Path, detail: str, action: str) -> None:
        """Record a problem that is never fatal (an ignored class, a stale <filename>)."""
        self.problems.append(Problem(kind, str(file), detail, action))

    def finish_index(
        self, source: str | Path, unknown_what: str, unknown_hint: str, own_lines: Sequence[str] = ()
    ) -> None:
        """End of a reader's constructor: unknown class names (all of them, one error), no usable image (an
        error), and one warning line per problem kind (except ``own_lines``, which the reader words itself)."""
        self.source = str(source)
        self.unknown.check(source, unknown_what, unknown_hint)
        if not self.records:
            dropped = [p.line() for p in self.problems if p.action == IMAGE_DROPPED]
            why = f": {len(dropped)} dropped, {first_few(dropped, 2)}" if dropped else ""
            raise fatal("no_usable_images", source, f"{source}: no usable images{why}")
        self.warnings.extend(summarize(self.problems, source, skip=own_lines))

    def merge_classes(self, name: str) -> None:
        """``data.single_cls``: after indexing has read and checked the dataset's own class names, every object
        becomes label 1 of the one class ``name``. Its category id is the first id of the dataset's numbering
        (0 for YOLO and 0-based COCO files, else 1), for predictions written in that numbering."""
        for rec in self.records:
            rec.labels = np.ones_like(rec.labels)
        self.category_ids = [0 if min(self.category_ids, default=1) == 0 else 1]
        self.class_names = [name]

    # -- samples -----------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the samples of ``epoch`` draw their augmentations; call it before the epoch's iterator is made."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, idx: int) -> Path:
        return self.records[idx].path

    def num_objects(self) -> int:
        """Boxes a sample will carry: difficult/crowd ones only when kept, and only boxes with an area
        (zero-area boxes are dropped by the training transforms' SanitizeBoundingBoxes)."""
        total = 0
        for rec in self.records:
            boxes = rec.boxes if self.keep_difficult else rec.boxes[~rec.difficult]
            if rec.normalized:  # the clamp __getitem__ applies once the size is known
                boxes = boxes.clip(0.0, 1.0)
            total += int(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).sum())
        return total

    def __getitem__(self, idx: int) -> tuple[tv_tensors.Image, Target]:
        idx = int(idx)
        if idx < 0:  # the same sample, hence the same draw, as its positive index
            idx += len(self)
        try:
            return self._sample(idx, idx)
        except DatasetError as exc:
            # A sample is read by one process only (its shard): that process must report it, not rank 0.
            exc.local = True
            if self.on_bad_sample == "error":
                raise
            if self.on_bad_sample == "blank":
                return self._blank(idx)
            return self._replacement(idx, str(exc).replace("\n", " "))  # decoder messages may span lines

    def _replacement(self, idx: int, failure: str) -> tuple[tv_tensors.Image, Target]:
        """The next index after ``idx`` that loads, drawn with ``idx``'s seed (so it is not a pixel copy of
        that sample's own draw), reporting ``idx``'s failure. Only ``idx``'s: the bad samples passed on the
        way report themselves when their own index comes, so every failure is counted once per epoch."""
        n = len(self)
        for step in range(1, n):
            try:
                image, target = self._sample((idx + step) % n, idx)
            except DatasetError:
                continue
            target["replaced"] = [failure]
            return image, target
        raise DatasetError(f"{self.source}: none of the {n} samples loads; the first: {failure}", local=True)

    def _blank(self, idx: int) -> tuple[tv_tensors.Image, Target]:
        image = tv_tensors.Image(torch.zeros(self.channels, 1, 1, dtype=torch.uint8))
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(1, 1)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "difficult": torch.zeros(0, dtype=torch.bool),
            "image_id": self.records[idx].image_id,
            "orig_size": (1, 1),
            "file": str(self.records[idx].path),
        }
        image, target = self._transform(image, target, idx)
        target["unreadable"] = True
        return image, target

    def _sample(self, idx: int, draw: int) -> tuple[tv_tensors.Image, Target]:
        """Sample ``idx`` with the augmentation draw of index ``draw``."""
        image, target = self._load(idx)
        return self._transform(image, target, draw)

    def _transform(self, image: tv_tensors.Image, target: Target, draw: int) -> tuple[tv_tensors.Image, Target]:
        transforms = self.transforms
        if isinstance(transforms, StagedTransforms):
            transforms = transforms.at(self.epoch)
        if transforms is None:
            return image, target
        # fork_rng restores the CPU generator afterwards: the caller's stream (the training loop's, with
        # num_workers = 0) does not move with the data. Only the CPU generator is reseeded (torch.manual_seed
        # would reseed every GPU too, and fork_rng(devices=[]) would not restore them).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, draw))
            if isinstance(transforms, Mosaic):  # its partners are drawn from the same seeded generator
                return transforms.apply(image, target, len(self), self._partner)
            return transforms(image, target)

    def _partner(self, idx: int) -> tuple[tv_tensors.Image, Target] | None:
        """A mosaic partner, untransformed; ``None`` if it does not load and the policy is not "error" (the mosaic
        puts its own sample in that place; the partner reports its failure when its own index comes, so it is
        counted once per epoch)."""
        try:
            return self._load(idx)
        except DatasetError:
            if self.on_bad_sample == "error":
                raise
            return None

    def _load(self, idx: int) -> tuple[tv_tensors.Image, Target]:
        rec = self.records[idx]
        image = load_image(rec.path if rec.image is None else rec.image, self.channels)
        h, w = image.shape[-2:]
        boxes, labels, difficult = rec.boxes, rec.labels, rec.difficult
        if not self.keep_difficult:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        boxes = torch.from_numpy(boxes.copy())  # records stay untouched: the clamp below is in place
        if rec.normalized:
            boxes = boxes * torch.tensor([w, h, w, h], dtype=torch.float32)
        # Boxes partly outside the image are clamped; a box wholly outside becomes degenerate and the
        # training transforms' SanitizeBoundingBoxes drops it.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(labels.copy()),
            "difficult": torch.from_numpy(difficult.copy()),
            "image_id": rec.image_id,
            "orig_size": (int(h), int(w)),
            "file": str(rec.path),  # what the trainer names when a batch goes wrong
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_objects()} objects, "
            f"classes: {class_list(self.class_names)})"
        )
