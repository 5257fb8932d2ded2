"""Batching: stacked images plus a list of per-image target dicts (torchvision's detection contract)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Batch = tuple[torch.Tensor, list[dict[str, Any]]]


def _plain(t: torch.Tensor) -> torch.Tensor:
    # tv_tensors subclasses carry metadata through every op, which torchvision models and accelerate's
    # device moves do not expect; strip them at the batch boundary.
    return t.as_subclass(torch.Tensor)


def collate_fn(batch: Sequence[tuple[Any, dict[str, Any]]]) -> Batch:
    """``[(image, target), ...]`` -> ``(uint8 (N, C, H, W), [target with plain tensors, ...])``.

    The bad-sample news passes through as is, present only on the targets concerned: ``"replaced"`` (list of
    one-line messages: this sample stands in for one that failed to load) and ``"unreadable"`` (True: a blank
    val image standing for an unreadable one; see dataset.py)."""
    shapes = {tuple(image.shape) for image, _ in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"images of one batch differ in shape {sorted(shapes)}: resize them to one size first"
        )
    images = torch.stack([_plain(image) for image, _ in batch])
    targets = []
    for _, t in batch:
        out: dict[str, Any] = {
            "boxes": _plain(t["boxes"]).to(torch.float32).reshape(-1, 4),
            "labels": _plain(t["labels"]).to(torch.int64),
            "difficult": _plain(t["difficult"]).to(torch.bool),
            "image_id": torch.tensor(int(t["image_id"]), dtype=torch.int64),
            "orig_size": torch.tensor(tuple(int(v) for v in t["orig_size"]), dtype=torch.int64),
        }
        if "file" in t:  # the image file, for messages about this sample
            out["file"] = str(t["file"])
        if t.get("replaced"):
            out["replaced"] = [str(m) for m in t["replaced"]]
        if t.get("unreadable"):
            out["unreadable"] = True
        targets.append(out)
    return images, targets
