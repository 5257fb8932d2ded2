"""Detectors: the registry, and ``build_model(recipe)``.

Importing this package imports every model module, so the registry is always complete (no registry whose
modules are never imported).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from accel_det.models import faceboxes, ssd, torchvision_zoo  # noqa: F401  (registration)
from accel_det.models.base import MODELS
from accel_det.models.weights import LoadReport, WeightsError, load_weights

__all__ = ["MODELS", "LoadReport", "WeightsError", "build_model", "load_weights"]


def build_model(recipe: Any) -> tuple[nn.Module, LoadReport | None]:
    """Build the recipe's detector and load ``model.weights`` if set. Returns the model and the load report."""
    model = MODELS.get(recipe.model.name)(recipe)
    report = load_weights(model, recipe.model.weights) if recipe.model.weights else None
    return model, report
