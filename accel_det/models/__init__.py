"""Detectors: the registry, and ``build_model(recipe)``.

Importing this package imports every model module, so the registry is always complete (no registry whose
modules are never imported).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from accel_det.models import anchor_free, faceboxes, ssd, torchvision_zoo  # noqa: F401  (registration)
from accel_det.models.base import MODELS
from accel_det.models.weights import LoadReport, WeightsError, load_weights

__all__ = ["MODELS", "LoadReport", "WeightsError", "build_model", "load_weights"]


def build_model(recipe: Any) -> tuple[nn.Module, LoadReport | None]:
    """Build the recipe's detector (its init done), load ``model.backbone_weights`` then ``model.weights`` if
    set. Returns the model and the report of the last file loaded."""
    model = MODELS.get(recipe.model.name)(recipe)
    report = None
    if recipe.model.backbone_weights:
        from accel_det.models.timm_backbone import load_backbone_weights

        report = load_backbone_weights(model, recipe.model.backbone_weights)
    if recipe.model.weights:
        report = load_weights(model, recipe.model.weights)
    return model, report
