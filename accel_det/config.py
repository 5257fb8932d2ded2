"""The recipe: one pydantic model per TOML table (reading it, overrides and errors: config_io.py, which imports
this module and never the other way round).

This module must stay importable without torch: ``accel-det validate`` runs in well under a second.
Every model forbids unknown keys; every key here is read somewhere in the package.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

# the model names live in the torch-free catalog; re-exported here, where tests and modules import them
from accel_det.catalog import (
    ANCHOR_FREE_INFO,
    KNOWN_MODELS,
    NATIVE_INFO,
    NATIVE_MODELS,
    TIMM_NAME,
    TIMM_PREFIX,
    TORCHVISION_MODELS,
    backbone_stages,
    feature_strides,
    timm_backbone_known,
)
from accel_det.config_anchors import AnchorConfig, given_anchor_keys, model_anchors
from accel_det.config_data import DataConfig, MixConfig, StageConfig, SyntheticConfig
from accel_det.config_train import TrainConfig
from accel_det.config_types import (
    Factor,
    KeyedError,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Prob,
    StrictBool,
    StrictFloat,
    StrictInt,
    Table,
    UnitOpen,
    suggest,
)
from accel_det.errors import RecipeError
from accel_det.trackers import TRACKERS

__all__ = [
    "KNOWN_MODELS",
    "NATIVE_MODELS",
    "TORCHVISION_MODELS",
    "TRACKERS",
    "AnchorConfig",
    "DataConfig",
    "MixConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "StrictFloat",
    "StrictInt",
    "SyntheticConfig",
]


class MissionConfig(Table):
    name: str = Field("demo", description="Mission name; the run dir is {output.root}/{name}/round{round}")
    round: NonNegInt = Field(1, description="Round of the mission (a new round = a new run dir)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("must be a non-empty name of letters, digits, '_', '-', '.' (it names a folder)")
        return v


class OutputConfig(Table):
    root: str = Field("runs", description="Folder that holds every mission's run dirs")
    checkpoint_freq: NonNegInt = Field(1, description="Save a checkpoint every N epochs (0 = only the last)")
    keep_last: NonNegInt = Field(3, description="Keep the newest N epoch checkpoints (0 = keep all)")
    save_best: StrictBool = Field(True, description="Keep checkpoints/best by eval's headline metric")
    checkpoint_every_steps: NonNegInt = Field(
        0, description="Also save inside an epoch every N optimizer steps (0 = off); only the newest is kept"
    )
    report: StrictBool = Field(
        True, description="Write plots/ and report.html at the end of training (accel-det report can later)"
    )
    resume: str = Field(
        "auto", description="'auto' (latest checkpoint in the run dir), 'never', or a checkpoint path"
    )


class ModelConfig(Table):
    name: str = Field("ssdlite_mobilenet_v3", description="Registry key of the detector")
    num_classes: PosInt | None = Field(
        None, description="Object classes without background; default len(data.class_names)"
    )
    img_dim: PosInt = Field(320, description="Square input size (px) the images are resized to")
    channels: PosInt = Field(3, description="Input channels (native models)")
    weights: str = Field("", description="Local .safetensors/.pth to load; 'module.'/'_orig_mod.' stripped")
    init: Literal["default", "xavier", "kaiming"] = Field(
        "default", description="Weight init of native models (xavier/kaiming as in FaceBoxes/YOLO)"
    )
    loc_loss: Literal["smooth_l1", "l1", "giou", "diou", "ciou"] = Field(
        "smooth_l1",
        description="MultiBox localisation loss: smooth_l1/l1 on the encoded offsets (SSD, FaceBoxes), or an IoU "
        "loss on the decoded boxes (torchvision.ops: generalized, distance, complete IoU)",
    )
    loc_weight: PosFloat = Field(1.0, description="Weight of the localisation term against the classification one")
    cls_loss: Literal["ce", "qfl", "vfl"] = Field(
        "ce",
        description="MultiBox classification: ce = softmax cross-entropy with hard negative mining (SSD); qfl / vfl "
        "= sigmoid scores trained towards each matched box's IoU, over every prior (quality focal loss, GFL; "
        "varifocal loss, VarifocalNet): the score ranks boxes by their quality, what AP at strict IoUs rewards. "
        "afdet_mobilenet_v3 (always sigmoid): qfl or vfl, and ce means its default, vfl",
    )
    neg_pos_ratio: PosFloat = Field(
        3.0, description="MultiBox hard-negative mining negatives per positive (model.cls_loss = 'ce')"
    )
    match_iou: Prob = Field(0.35, description="MultiBox: IoU for a prior to match a ground-truth box")
    sync_bn: StrictBool = Field(False, description="BatchNorm -> SyncBatchNorm with several GPU processes")
    recompute: NonNegInt = Field(
        0, description="Native models: recompute the first N backbone stages in backward (less memory)"
    )
    backbone: str = Field(
        "",
        description="Native models: 'timm:<name>' puts the model's heads on that timm backbone (features_only, "
        "built without weights; needs pip install accel-det[timm]); '' = the model's own backbone",
    )
    backbone_weights: str = Field(
        "",
        description="Local .safetensors/.pth for model.backbone (e.g. its timm classifier's; never downloaded), "
        "loaded after model.init and before model.weights",
    )
    # Declared after name, img_dim and backbone: the validator below reads them from info.data.
    anchors: AnchorConfig | None = Field(
        None,
        description="Prior boxes of native anchor models; keys left out take the model's defaults at img_dim. "
        "Always complete for a native model after validation (recipe.json records them); null otherwise",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in KNOWN_MODELS:
            raise ValueError(f"unknown model {v!r}{suggest(v, KNOWN_MODELS)}; known: {', '.join(KNOWN_MODELS)}")
        return v

    @field_validator("backbone")
    @classmethod
    def _timm_backbone(cls, v: str) -> str:
        if not v:
            return v
        if not re.fullmatch(re.escape(TIMM_PREFIX) + TIMM_NAME, v):
            raise ValueError(f"{v!r} must be '' or 'timm:<timm model name>', e.g. 'timm:resnet18' (a name, not a "
                             "hub id or path: backbones are never downloaded, weights go in model.backbone_weights)")
        if not _timm_installed():
            raise ValueError(f"{v!r} needs the timm package: pip install accel-det[timm]")
        return v

    @field_validator("anchors", mode="wrap")
    @classmethod
    def _resolve_anchors(
        cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> AnchorConfig | None:
        # Complete the table *before* AnchorConfig validates it: completed with FaceBoxes' defaults, a
        # partial SSD table would fail (or, worse, pass) on the wrong model's anchors.
        name, img_dim = info.data.get("name"), info.data.get("img_dim")
        given = given_anchor_keys(v)
        if name not in NATIVE_INFO or img_dim is None or given is None:
            # a torchvision model (a table is rejected below), or name/img_dim already failed
            return handler(v)
        backbone = info.data.get("backbone") or ""
        try:
            strides = feature_strides(name, backbone) if backbone else None
        except ValueError:  # a backbone the head cannot use: the model validator below says so
            strides = None
        return model_anchors(name, img_dim, given, handler, strides, _label(name, backbone))

    @model_validator(mode="after")
    def _anchors_fit_model(self) -> ModelConfig:
        if self.anchors is not None and self.name in ANCHOR_FREE_INFO:
            raise KeyedError("anchors", f"{self.name} is anchor-free: remove [model.anchors]")
        if self.anchors is not None and self.name not in NATIVE_MODELS:
            raise ValueError(f"[model.anchors] applies only to native models ({', '.join(NATIVE_MODELS)})")
        if self.name in TORCHVISION_MODELS and self.channels != 3:
            raise ValueError("torchvision detectors take 3-channel images (channels = 3)")
        self._backbone_fits()
        self._recompute_fits()
        if self.name in NATIVE_INFO:
            # validate_assignment of name, img_dim or backbone runs only this validator: re-derive the unset keys
            given = given_anchor_keys(self.anchors) or {}
            strides = self.feature_strides()
            label = _label(self.name, self.backbone)
            try:
                anchors = model_anchors(self.name, self.img_dim, given, AnchorConfig.model_validate, strides, label)
            except ValidationError as exc:
                raise KeyedError("anchors", exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
            if anchors != self.anchors:
                self.__dict__["anchors"] = anchors  # already validated; setattr would validate again
            # a timm name outside the catalog's table: its strides are only assumed, the built model checks them
            if anchors.steps != list(strides) and (not self.backbone or timm_backbone_known(self.backbone)):
                raise KeyedError(
                    "anchors.steps",
                    f"must be {list(strides)}: {label} predicts on {len(strides)} feature maps at these strides "
                    f"(got {anchors.steps})",
                )
        return self

    def feature_strides(self) -> tuple[int, ...]:
        """A native model's feature strides, on its own backbone or on ``backbone`` (for a timm name outside
        the catalog's table, those of the usual CNN pyramid: the built model checks)."""
        return feature_strides(self.name, self.backbone)

    def _backbone_fits(self) -> None:
        if self.backbone_weights and not self.backbone:
            raise KeyedError("backbone_weights", "needs model.backbone (the whole model's weights go in model.weights)")
        if not self.backbone:
            return
        if self.name in ANCHOR_FREE_INFO:
            raise KeyedError("backbone", f"{self.name} has only its own backbone: use '' (timm backbones are for "
                             f"{', '.join(NATIVE_MODELS)})")
        if self.name not in NATIVE_INFO:
            raise KeyedError("backbone", f"applies only to native models ({', '.join(NATIVE_MODELS)})")
        try:
            self.feature_strides()
        except ValueError as exc:
            raise KeyedError("backbone", f"{self.backbone}: {exc}") from None

    def _recompute_fits(self) -> None:
        if not self.recompute:
            return
        if self.name not in NATIVE_INFO and self.name not in ANCHOR_FREE_INFO:
            raise KeyedError("recompute", f"applies only to native models ({', '.join(NATIVE_MODELS)})")
        if self.backbone:
            n = backbone_stages(self.name, self.backbone)
            if n is None:
                raise KeyedError("recompute", f"{self.backbone} runs as one call (timm's own feature class), it has "
                                 "no stages to recompute: use 0 or a backbone timm wraps in FeatureListNet")
            if self.recompute > n:
                raise KeyedError("recompute", f"{self.recompute} but {_label(self.name, self.backbone)} has {n} "
                                 "backbone stages (timm's feature levels up to the head's last)")
            return
        stages = (NATIVE_INFO.get(self.name) or ANCHOR_FREE_INFO[self.name]).stages
        if self.recompute > len(stages):
            raise KeyedError(
                "recompute",
                f"{self.recompute} but {self.name} has {len(stages)} backbone stages ({', '.join(stages)})",
            )


def _label(name: str, backbone: str) -> str:
    return f"{name} on {backbone}" if backbone else name


def _timm_installed() -> bool:
    """Torch-free: finds the package without importing it (timm imports torch)."""
    try:
        return importlib.util.find_spec("timm") is not None
    except (ImportError, ValueError):  # a broken parent package, or a module in sys.modules without a spec
        return False


class OptimizerConfig(Table):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer")
    lr: PosFloat = Field(1e-3, description="Base learning rate")
    momentum: UnitOpen = Field(0.9, description="SGD momentum")
    nesterov: StrictBool = Field(False, description="SGD Nesterov momentum")
    betas: tuple[UnitOpen, UnitOpen] = Field(
        (0.9, 0.999), description="Adam/AdamW betas, each in [0, 1)"
    )
    weight_decay: NonNegFloat = Field(5e-4, description="Weight decay")
    no_decay_norm_bias: StrictBool = Field(True, description="No weight decay on norm weights and biases")

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name = 'sgd' and momentum > 0")
        return self


class SchedulerConfig(Table):
    name: Literal["multistep", "step", "cosine", "constant"] = Field("multistep", description="LR schedule")
    milestones: list[PosInt] = Field(default_factory=list, description="multistep: epochs where LR *= gamma")
    step_size: PosInt = Field(30, description="step: LR *= gamma every step_size epochs")
    gamma: Factor = Field(0.1, description="multistep/step decay factor")
    min_lr_ratio: Prob = Field(0.0, description="cosine: final LR as a fraction of the base LR")
    warmup_iters: NonNegInt = Field(0, description="Warmup length in optimizer steps")
    warmup_factor: Factor = Field(0.001, description="LR factor at step 0")
    warmup_method: Literal["linear", "constant"] = Field("linear", description="Warmup shape")
    warmup_momentum: UnitOpen = Field(
        0.8, description="SGD momentum (Adam beta1) at step 0, ramped linearly to its value over warmup_iters"
    )
    warmup_bias_lr: NonNegFloat = Field(
        0.0, description="Biases' LR at step 0, ramped linearly to the schedule's over warmup_iters (0 = off)"
    )

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _bias_warmup(self) -> SchedulerConfig:
        if self.warmup_bias_lr > 0 and self.warmup_iters == 0:
            raise KeyedError("warmup_bias_lr", "ramps over scheduler.warmup_iters, which is 0")
        return self


class EvalConfig(Table):
    freq: NonNegInt = Field(10, description="Evaluate every N epochs (0 = only at the end)")
    compute_map: StrictBool = Field(True, description="Compute mAP (false: skip evaluation)")
    metric: Literal["coco", "voc07", "voc12"] = Field("coco", description="Headline metric")
    conf_thres: Prob = Field(0.001, description="Score threshold before NMS")
    iou_thres: Prob = Field(0.5, description="NMS IoU threshold")
    max_det: PosInt = Field(100, description="Detections kept per image (COCO maxDets[-1])")
    backend: Literal["auto", "faster_coco_eval", "pycocotools"] = Field("auto", description="COCOeval")
    batch_size: PosInt | None = Field(None, description="Eval images per process; default data.batch_size")
    nms_time_limit: NonNegFloat = Field(
        0.0, description="Seconds per batch: slower batches are counted, never truncated (0 = off)"
    )


class LogConfig(Table):
    trackers: list[str] = Field(
        default_factory=list, description="Accelerate trackers (log_with), e.g. ['tensorboard']"
    )

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}{suggest(name, TRACKERS)}; known: {', '.join(TRACKERS)}")
        return v


class Recipe(Table):
    mission: MissionConfig = Field(default_factory=MissionConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        k = len(self.output_class_names)
        if self.model.num_classes is None:
            self.model.num_classes = k
        elif self.model.num_classes != k:
            trains = "data.single_cls = true trains 1 class" if self.data.single_cls else (
                f"data.class_names has {k} names")
            raise ValueError(f"model.num_classes = {self.model.num_classes} but {trains}")
        fixed = self.scheduler.name == "step" or (self.scheduler.name == "multistep" and self.scheduler.milestones)
        if self.train.time_budget_minutes is not None and fixed:
            raise KeyedError("scheduler.name", f"{self.scheduler.name!r} decays at fixed epochs, and with "
                             "train.time_budget_minutes the epochs are planned while training: use 'cosine' or "
                             "'constant' (both are fitted to the planned epochs)")
        if self.scheduler.name == "multistep" and self.scheduler.milestones:
            last = self.scheduler.milestones[-1]
            if last > self.train.max_epoch:
                raise ValueError(
                    f"scheduler.milestones: {last} is past train.max_epoch = {self.train.max_epoch}"
                )
        self._img_dim_fits_batch()
        return self

    def _img_dim_fits_batch(self) -> None:
        """The one img_dim a native net cannot train at (tests/test_config.py builds the nets to check).

        Every stride-2 layer pads "same", so a map is ceil(img_dim / stride) cells, the count PriorBox
        assumes: predictions and priors agree at every img_dim. But at img_dim <= the largest stride the
        last map is 1x1, and with one image per batch (training drops partial batches, so that is
        data.batch_size = 1) its BatchNorm sees one value per channel and torch refuses to train.
        """
        if (self.model.name not in NATIVE_INFO and self.model.name not in ANCHOR_FREE_INFO) or self.data.batch_size > 1:
            return
        top = max(self.model.feature_strides())
        if self.model.img_dim <= top:
            raise KeyedError(
                "model.img_dim",
                f"{self.model.img_dim} makes the stride-{top} feature map of {self.model.name} 1x1, and BatchNorm "
                f"cannot train on it with data.batch_size = 1: use img_dim > {top} or data.batch_size >= 2",
            )

    @property
    def num_classes(self) -> int:
        assert self.model.num_classes is not None
        return self.model.num_classes

    @property
    def output_class_names(self) -> list[str]:
        """The classes the model predicts, labels 1..K in this order: ``data.class_names``, or the one
        ``data.single_cls_name`` with ``data.single_cls`` (tables, metrics, predictions and exports name these)."""
        return [self.data.single_cls_name] if self.data.single_cls else list(self.data.class_names)

    def run_dir(self) -> Path:
        return Path(self.output.root) / self.mission.name / f"round{self.mission.round}"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)
