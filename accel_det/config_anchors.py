"""``[model.anchors]``: the prior boxes of the native anchor models, and how a partial table is completed with
the chosen model's own defaults (accel_det/catalog.py). Torch-free, like the schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from accel_det.catalog import NATIVE_INFO, default_anchors, faceboxes_anchors
from accel_det.config_types import KeyedError, PosFloat, PosInt, StrictBool, Table


class AnchorConfig(Table):
    """``[model.anchors]``. Standalone, the defaults are FaceBoxes'; in a recipe, every key left out takes
    the chosen model's default (``ModelConfig`` resolves them) and ``model_fields_set`` keeps the keys the
    recipe set."""

    min_sizes: list[list[PosFloat]] = Field(
        default_factory=lambda: faceboxes_anchors()["min_sizes"],
        description="Anchor sizes (px at img_dim) per feature map (faceboxes: 32/64/128, 256, 512; ssdlite: "
        "fractions of img_dim). Every key left out takes the model's default",
    )
    steps: list[PosInt] = Field(
        default_factory=lambda: faceboxes_anchors()["steps"],
        description="Stride (px) of each feature map: the model's (faceboxes 32/64/128, ssdlite 8/16/32/64)",
    )
    aspect_ratios: list[list[PosFloat]] = Field(
        default_factory=lambda: faceboxes_anchors()["aspect_ratios"],
        description="Extra aspect ratios (w/h) per feature map; each r adds r and 1/r. [] = square only",
    )
    densify: StrictBool = Field(
        faceboxes_anchors()["densify"],
        description="FaceBoxes anchor densification: tile anchors smaller than 4x the stride (false for SSD anchors)",
    )
    variance: tuple[PosFloat, PosFloat] = Field(
        faceboxes_anchors()["variance"], description="SSD box-coder variances"
    )
    clip: StrictBool = Field(faceboxes_anchors()["clip"], description="Clip prior boxes to the image")

    @model_validator(mode="after")
    def _same_length(self) -> AnchorConfig:
        if len(self.min_sizes) != len(self.steps):
            raise ValueError(
                f"min_sizes has {len(self.min_sizes)} feature maps but steps has {len(self.steps)}"
            )
        if self.aspect_ratios and len(self.aspect_ratios) != len(self.steps):
            raise ValueError(
                f"aspect_ratios has {len(self.aspect_ratios)} feature maps but steps has {len(self.steps)}"
            )
        return self


def given_anchor_keys(value: Any) -> dict[str, Any] | None:
    """The keys a ``[model.anchors]`` value sets (a table, an AnchorConfig, None), or None for a value of
    another type (left to pydantic to report)."""
    if value is None:
        return {}
    if isinstance(value, AnchorConfig):
        return {k: getattr(value, k) for k in value.model_fields_set}
    if isinstance(value, dict):
        return dict(value)
    return None


def model_anchors(
    name: str,
    img_dim: int,
    given: dict[str, Any],
    validate: Callable[[Any], AnchorConfig],
    strides: tuple[int, ...] | None = None,
    label: str | None = None,
) -> AnchorConfig:
    """``given`` completed with the model's defaults at img_dim; fields_set stays ``given``'s keys, so a
    later change of model.name or model.img_dim re-derives the rest. ``strides``: the net's feature strides
    on another backbone (``label`` then names both, e.g. "ssdlite_resnet18 on timm:convnext_atto")."""
    merged = {**default_anchors(name, img_dim, strides), **given}
    strides = strides or NATIVE_INFO[name].strides
    name = label or name
    # Lengths first, on the keys the recipe set: a default of the model's length must not be what a wrong
    # length is compared with ("aspect_ratios has 4 feature maps" when the recipe never set it).
    lengths = {
        k: len(v)
        for k in ("steps", "min_sizes", "aspect_ratios")
        if isinstance(v := given.get(k), list) and (v or k != "aspect_ratios")
    }
    if len(set(lengths.values())) > 1:
        validate(merged)  # raises: AnchorConfig names the two keys that disagree
    for key, n in lengths.items():
        if n != len(strides):
            raise KeyedError(
                key, f"{name} has {len(strides)} feature maps (strides {list(strides)}) but {key} lists {n}"
            )
    anchors = validate(merged)
    anchors.__pydantic_fields_set__ = set(given) & set(AnchorConfig.model_fields)
    return anchors
