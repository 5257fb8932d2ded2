"""``[data.mix]``: a second training set drawn with probability ``rate`` per sample.

``MixedDataset`` is the two training splits end to end (``ConcatDataset`` indexing: the first set's indices,
then the second's), and answers what the engine and the data doctor ask of a dataset (``set_epoch``,
``problems``, ``warnings``, ``num_objects``, ``records``, ...). Each set keeps its own per-sample
randomness and bad-sample policy, so a replaced sample is replaced from its own set.

``MixSampler`` says which indices an epoch visits. Epoch length: ``round(len(first) / (1 - rate))`` samples,
so the first set -- the dataset the recipe is about -- is seen about once per epoch whatever the rate, and
epoch-based keys (``train.max_epoch``, milestones, eval and checkpoint frequencies) keep their meaning; the
second set contributes about ``rate`` of each epoch, however large or small it is. Each position is from the
second set with probability ``rate``; within a set, indices come from successive random permutations (each
image once before any twice). The whole sequence is a function of (``train.seed``, epoch) only, so it is the
same for any number of processes and after a resume. It is the *global* sequence: ``accelerator.prepare``
wraps custom samplers in ``BatchSamplerShard``, which gives process p batches p, p + N, p + 2N, ... (disjoint,
and together the whole epoch but the last incomplete round of batches, which ``drop_last`` drops anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Sampler
from torchvision import tv_tensors

from .common import Problem, Record
from .dataset import DetectionDataset, sample_seed

# Indices no sample has: the streams of the mix order and of the second set's augmentations stay apart from
# the per-sample augmentation seeds (dataset.sample_seed).
_MIX_STREAM = 2**64 - 1
_SECOND_SET = 2**64 - 2


def second_set_seed(seed: int) -> int:
    """The augmentation seed of the second set: with ``seed`` itself, sample i of both sets would draw the
    very same flips and crops in every epoch."""
    return sample_seed(seed, 0, _SECOND_SET)


def mix_epoch_length(first: int, rate: float) -> int:
    """Samples per epoch of a mix: ``len(first) / (1 - rate)``, rounded (see the module docstring)."""
    return max(1, round(first / (1.0 - rate)))


class MixedDataset(ConcatDataset):
    """``first`` (data.train) then ``second`` (data.mix.train); both share class names and transforms."""

    datasets: list[DetectionDataset]

    def __init__(self, first: DetectionDataset, second: DetectionDataset) -> None:
        super().__init__([first, second])
        self.first, self.second = first, second

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            ds.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.first.epoch

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.first), len(self.second)

    def __getitem__(self, idx: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        return super().__getitem__(int(idx))

    @property
    def records(self) -> list[Record]:
        """Both sets' records, in index order."""
        return [*self.first.records, *self.second.records]

    def image_path(self, idx: int) -> Path:
        return self.records[idx].path

    @property
    def problems(self) -> list[Problem]:
        return [*self.first.problems, *self.second.problems]

    @property
    def warnings(self) -> list[str]:
        return [*self.first.warnings, *self.second.warnings]

    def num_objects(self) -> int:
        return self.first.num_objects() + self.second.num_objects()

    # what the engine and the data doctor read of a dataset: the same in both sets (one recipe built them)
    @property
    def class_names(self) -> list[str]:
        return self.first.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.first.category_ids

    @property
    def channels(self) -> int:
        return self.first.channels

    @property
    def keep_difficult(self) -> bool:
        return self.first.keep_difficult

    @property
    def on_bad_sample(self) -> str:
        return self.first.on_bad_sample

    @property
    def source(self) -> str:
        return f"{self.first.source} + {self.second.source}"

    def __repr__(self) -> str:
        return f"MixedDataset({self.first!r}, {self.second!r})"


class MixSampler(Sampler[int]):
    """The indices of one epoch of a ``MixedDataset`` of ``sizes`` (see the module docstring); ``set_epoch``
    before each epoch. ``len()`` is ``mix_epoch_length(sizes[0], rate)``."""

    def __init__(self, sizes: tuple[int, int], rate: float, seed: int) -> None:
        super().__init__()
        if not 0.0 < rate < 1.0 or min(sizes) < 1:
            raise ValueError(f"MixSampler needs 0 < rate < 1 and two non-empty sets, got rate {rate}, sizes {sizes}")
        self.sizes, self.rate, self.seed = (int(sizes[0]), int(sizes[1])), float(rate), int(seed)
        self.length = mix_epoch_length(self.sizes[0], self.rate)
        # not named "generator": accelerate would take the attribute for a shuffle generator to synchronise
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def indices(self) -> torch.Tensor:
        """The epoch's sequence as an int64 tensor (what ``__iter__`` yields)."""
        g = torch.Generator()
        g.manual_seed(sample_seed(self.seed, self.epoch, _MIX_STREAM))
        second = torch.rand(self.length, generator=g) < self.rate
        n2 = int(second.sum())
        order = torch.empty(self.length, dtype=torch.int64)
        order[~second] = _permutations(self.sizes[0], self.length - n2, g)
        order[second] = self.sizes[0] + _permutations(self.sizes[1], n2, g)
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


def _permutations(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` indices of ``range(n)``: successive random permutations, cut at ``k``."""
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(-(-k // n))])[:k]
