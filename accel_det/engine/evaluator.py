"""Distributed inference -> per-image records -> metrics on the main process.

Every process runs its shard; ``gather_for_metrics`` drops the samples the sampler repeated to pad the last
batch, so exactly ``len(val_set)`` images are scored for any process count. Metrics run on the main process
only; the headline number is then broadcast so that every process takes the same "is best" decision (a
checkpoint save is a collective).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from accel_det.data.transforms import to_original
from accel_det.errors import EvaluationError


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    # uint8 travels host->device (4x less than float); the cast happens on the device
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _seconds(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
    return time.perf_counter()


@torch.inference_mode()
def predict_records(
    model: nn.Module, loader: Any, accelerator: Accelerator, time_limit: float = 0.0, letterbox: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Run ``model`` over ``loader`` on every process; return all images' records (gathered, deduplicated)
    and how many of this process's batches took longer than ``time_limit`` seconds (inference + NMS; 0: not
    timed, so no synchronisation is added). Slow batches are counted, never cut short: truncating NMS
    silently lowers mAP."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    slow = 0
    for images, targets in loader:
        x = to_float_images(images)
        t0 = _seconds(x.device) if time_limit > 0 else 0.0
        with accelerator.autocast():
            outputs = model(x)
        if time_limit > 0 and _seconds(x.device) - t0 > time_limit:
            slow += 1
        img_dim = int(x.shape[-1])
        batch = []
        for out, tgt in zip(outputs, targets):
            if tgt.get("unreadable"):  # a val image that could not be read: left out of the metric, counted
                batch.append({"image_id": int(tgt["image_id"]), "unreadable": True})
                continue
            h, w = (int(v) for v in tgt["orig_size"].tolist())
            # undo the eval resize (or letterbox): scores are computed in original-image pixels
            batch.append({
                "image_id": int(tgt["image_id"]),
                "height": h,
                "width": w,
                "gt_boxes": to_original(tgt["boxes"], (h, w), img_dim, letterbox).cpu().numpy(),
                "gt_labels": tgt["labels"].cpu().numpy(),
                "gt_ignore": tgt["difficult"].cpu().numpy().astype(bool),
                "boxes": to_original(out["boxes"], (h, w), img_dim, letterbox).cpu().numpy(),
                "scores": out["scores"].float().cpu().numpy(),
                "labels": out["labels"].cpu().numpy(),
            })
        records.extend(accelerator.gather_for_metrics(batch, use_gather_object=True))
    model.train(was_training)
    return records, slow


def evaluate(
    model: nn.Module, loader: Any, accelerator: Accelerator, recipe: Any
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], float | None]:
    """Collective. Returns (metrics on main / None elsewhere, records on main / [] elsewhere, headline on all)."""
    from accel_det.metrics import evaluate_records

    # DDP broadcasts rank 0's buffers only at the start of a training forward, so after the last step each
    # process holds BatchNorm running stats updated by its own batch. Eval runs the unwrapped model: without
    # this, processes > 0 would score their shards with their own statistics, not the checkpoint's (rank 0's).
    if accelerator.num_processes > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf.data, src=0)
    limit = recipe.eval.nms_time_limit
    records, slow = predict_records(model, loader, accelerator, limit, recipe.data.letterbox)
    if limit > 0:
        slow = int(accelerator.reduce(torch.tensor([slow], device=accelerator.device), "sum").item())
    unreadable = sum(1 for r in records if r.get("unreadable"))
    records = [r for r in records if not r.get("unreadable")]
    result, error = None, ""
    if accelerator.is_main_process:
        try:
            result = evaluate_records(
                records,
                recipe.output_class_names,
                metric=recipe.eval.metric,
                backend=recipe.eval.backend,
                max_det=recipe.eval.max_det,
            )
        except ValueError as exc:  # bad records: every process must learn it, not wait at the broadcast
            error = f"evaluation failed: {exc}"
        else:
            if unreadable:
                result["num_unreadable"] = unreadable
            if limit > 0:
                result["slow_batches"] = slow  # over eval.nms_time_limit
    message = [float(result[result["headline"]]) if result else float("nan"), error]
    broadcast_object_list(message, from_process=0)
    value, error = message
    if error:
        raise EvaluationError(error)
    return result, records if accelerator.is_main_process else [], None if np.isnan(value) else value


@dataclass
class EvalOutput:
    result: dict[str, Any] | None  # metrics, main process only
    records: list[dict[str, Any]]  # per-image predictions, main process only
    headline: float | None  # on every process
    category_ids: list[int]

    def coco_results(self) -> list[dict[str, Any]]:
        """Predictions in the COCO results format, with the val annotations' own category ids."""
        from accel_det.metrics import coco_results

        return coco_results(self.records, self.category_ids)


class Evaluator:
    """``evaluate`` bound to what it scores: the model (unwrapped on each call), the prepared val loader and
    the recipe's metric settings. Calling it is a collective."""

    def __init__(self, model: nn.Module, loader: Any, accelerator: Accelerator, recipe: Any,
                 category_ids: list[int]) -> None:
        self.model = model
        self.loader = loader
        self.accelerator = accelerator
        self.recipe = recipe
        self.category_ids = category_ids

    def __call__(self) -> EvalOutput:
        model = self.accelerator.unwrap_model(self.model)
        result, records, headline = evaluate(model, self.loader, self.accelerator, self.recipe)
        return EvalOutput(result, records, headline, self.category_ids)
