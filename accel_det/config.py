"""The recipe: one pydantic model per TOML table, ``load_recipe()`` and ``key=value`` overrides.

This module must stay importable without torch: ``accel-det validate`` runs in well under a second.
Every model forbids unknown keys; every key here is read somewhere in the package.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from accel_det.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Registered model names, kept here so that validating a recipe never imports torch.
# tests/test_models.py asserts this equals the registry's names.
NATIVE_MODELS = ("faceboxes", "ssdlite_mobilenet_v3", "ssdlite_resnet18")
TORCHVISION_MODELS = (
    "tv_ssdlite320_mobilenet_v3_large",
    "tv_ssd300_vgg16",
    "tv_fasterrcnn_mobilenet_v3_large_320_fpn",
    "tv_retinanet_resnet50_fpn_v2",
    "tv_fcos_resnet50_fpn",
)
KNOWN_MODELS = NATIVE_MODELS + TORCHVISION_MODELS

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Prob = Annotated[float, Field(ge=0, le=1)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MissionConfig(_Table):
    name: str = Field("demo", description="Mission name; the run dir is {output.root}/{name}/round{round}")
    round: NonNegInt = Field(1, description="Round of the mission (a new round = a new run dir)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("must be a non-empty name of letters, digits, '_', '-', '.' (it names a folder)")
        return v


class OutputConfig(_Table):
    root: str = Field("runs", description="Folder that holds every mission's run dirs")
    checkpoint_freq: NonNegInt = Field(1, description="Save a checkpoint every N epochs (0 = only the last)")
    keep_last: NonNegInt = Field(3, description="Keep the newest N epoch checkpoints (0 = keep all)")
    save_best: bool = Field(True, description="Keep checkpoints/best by eval's headline metric")
    resume: str = Field(
        "auto", description="'auto' (latest checkpoint in the run dir), 'never', or a checkpoint path"
    )


class AnchorConfig(_Table):
    min_sizes: list[list[PosFloat]] = Field(
        default_factory=lambda: [[32.0, 64.0, 128.0], [256.0], [512.0]],
        description="Anchor sizes (px at img_dim) per feature map",
    )
    steps: list[PosInt] = Field(
        default_factory=lambda: [32, 64, 128], description="Stride (px) of each feature map"
    )
    aspect_ratios: list[list[PosFloat]] = Field(
        default_factory=list,
        description="Extra aspect ratios (w/h) per feature map; each r adds r and 1/r. [] = square only",
    )
    densify: bool = Field(
        True,
        description="FaceBoxes anchor densification: tile anchors smaller than 4x the stride (false for SSD anchors)",
    )
    variance: tuple[PosFloat, PosFloat] = Field((0.1, 0.2), description="SSD box-coder variances")
    clip: bool = Field(False, description="Clip prior boxes to the image")

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


class ModelConfig(_Table):
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
    loc_loss: Literal["smooth_l1", "l1"] = Field("smooth_l1", description="MultiBox localisation loss")
    neg_pos_ratio: PosFloat = Field(3.0, description="MultiBox hard-negative mining negatives per positive")
    match_iou: Prob = Field(0.35, description="MultiBox: IoU for a prior to match a ground-truth box")
    anchors: AnchorConfig | None = Field(
        None, description="Prior boxes of native anchor models; default: the model's own"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in KNOWN_MODELS:
            raise ValueError(f"unknown model {v!r}{_suggest(v, KNOWN_MODELS)}; known: {', '.join(KNOWN_MODELS)}")
        return v

    @model_validator(mode="after")
    def _anchors_only_native(self) -> ModelConfig:
        if self.anchors is not None and self.name not in NATIVE_MODELS:
            raise ValueError(f"[model.anchors] applies only to native models ({', '.join(NATIVE_MODELS)})")
        if self.name in TORCHVISION_MODELS and self.channels != 3:
            raise ValueError("torchvision detectors take 3-channel images (channels = 3)")
        return self


class SyntheticConfig(_Table):
    num_train: PosInt = Field(320, description="Synthetic training images")
    num_val: PosInt = Field(64, description="Synthetic validation images")
    img_size: PosInt = Field(128, description="Synthetic image size (px)")
    max_objects: PosInt = Field(4, description="At most this many shapes per image")
    seed: int = Field(0, description="Generator seed: same seed, same images")


class DataConfig(_Table):
    format: Literal["voc", "coco", "yolo", "synthetic"] = Field("synthetic", description="Dataset layout")
    root: str = Field("data/synthetic_shapes", description="Dataset folder (relative to the working dir)")
    train: str = Field(
        "ImageSets/Main/train.txt",
        description="voc: split file ('' = all); coco: instances JSON; yolo: image dir or list file",
    )
    val: str = Field("ImageSets/Main/val.txt", description="Like train, for the validation split")
    train_images: str = Field("", description="coco: image folder of the train JSON (relative to root)")
    val_images: str = Field("", description="coco: image folder of the val JSON (relative to root)")
    class_names: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        description="Class names; their order defines labels 1..K",
    )
    batch_size: PosInt = Field(16, description="Images per process per step")
    num_workers: NonNegInt = Field(2, description="DataLoader workers per process")
    augments: list[Literal["photometric", "zoom_out", "iou_crop", "hflip"]] = Field(
        default_factory=lambda: ["hflip"], description="Training augments (torchvision.transforms.v2)"
    )
    keep_difficult: bool = Field(False, description="voc: train on boxes marked difficult")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one class name")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _coco_only(self) -> DataConfig:
        if self.format != "coco" and (self.train_images or self.val_images):
            raise ValueError("train_images/val_images apply only to format = 'coco'")
        return self


class OptimizerConfig(_Table):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer")
    lr: PosFloat = Field(1e-3, description="Base learning rate")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam/AdamW betas, each in [0, 1)"
    )
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(5e-4, description="Weight decay")
    no_decay_norm_bias: bool = Field(True, description="No weight decay on norm weights and biases")

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name = 'sgd' and momentum > 0")
        return self


class SchedulerConfig(_Table):
    name: Literal["multistep", "step", "cosine", "constant"] = Field("multistep", description="LR schedule")
    milestones: list[PosInt] = Field(default_factory=list, description="multistep: epochs where LR *= gamma")
    step_size: PosInt = Field(30, description="step: LR *= gamma every step_size epochs")
    gamma: Annotated[float, Field(gt=0, le=1)] = Field(0.1, description="multistep/step decay factor")
    min_lr_ratio: Prob = Field(0.0, description="cosine: final LR as a fraction of the base LR")
    warmup_iters: NonNegInt = Field(0, description="Warmup length in optimizer steps")
    warmup_factor: Annotated[float, Field(gt=0, le=1)] = Field(0.001, description="LR factor at step 0")
    warmup_method: Literal["linear", "constant"] = Field("linear", description="Warmup shape")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be strictly increasing, got {v}")
        return v


class TrainConfig(_Table):
    max_epoch: PosInt = Field(30, description="Epochs to train")
    accumulation_freq: PosInt = Field(1, description="Batches per optimizer step (gradient accumulation)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto' takes the launcher's setting"
    )
    gpu_train: Literal["auto"] | bool = Field(
        "auto", description="true: require a GPU; false: CPU (Accelerator(cpu=True)); 'auto': GPU if visible"
    )
    seed: int = Field(0, description="Seed for torch/numpy/python on every process")
    clip_grad_norm: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="Max grad norm (0 = off)"
    )
    log_freq: PosInt = Field(10, description="Batches between plain log lines when stdout is not a TTY")
    cudnn_benchmark: bool = Field(True, description="torch.backends.cudnn.benchmark")
    loss_fp32: bool = Field(True, description="Compute native models' losses in fp32 under autocast")


class EvalConfig(_Table):
    freq: NonNegInt = Field(10, description="Evaluate every N epochs (0 = only at the end)")
    compute_map: bool = Field(True, description="Compute mAP (false: skip evaluation)")
    metric: Literal["coco", "voc07", "voc12"] = Field("coco", description="Headline metric")
    conf_thres: Prob = Field(0.001, description="Score threshold before NMS")
    iou_thres: Prob = Field(0.5, description="NMS IoU threshold")
    max_det: PosInt = Field(100, description="Detections kept per image (COCO maxDets[-1])")
    backend: Literal["auto", "faster_coco_eval", "pycocotools"] = Field("auto", description="COCOeval")
    batch_size: PosInt | None = Field(None, description="Eval images per process; default data.batch_size")


# what accelerate's ``log_with`` accepts (accelerate.utils.LoggerType); the package is checked at start
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


class LogConfig(_Table):
    trackers: list[str] = Field(
        default_factory=list, description="Accelerate trackers (log_with), e.g. ['tensorboard']"
    )

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}{_suggest(name, TRACKERS)}; known: {', '.join(TRACKERS)}")
        return v


class Recipe(_Table):
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
        k = len(self.data.class_names)
        if self.model.num_classes is None:
            self.model.num_classes = k
        elif self.model.num_classes != k:
            raise ValueError(
                f"model.num_classes = {self.model.num_classes} but data.class_names has {k} names"
            )
        if self.scheduler.name == "multistep" and self.scheduler.milestones:
            last = self.scheduler.milestones[-1]
            if last > self.train.max_epoch:
                raise ValueError(
                    f"scheduler.milestones: {last} is past train.max_epoch = {self.train.max_epoch}"
                )
        return self

    @property
    def num_classes(self) -> int:
        assert self.model.num_classes is not None
        return self.model.num_classes

    def run_dir(self) -> Path:
        return Path(self.output.root) / self.mission.name / f"round{self.mission.round}"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides, one-line errors


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the table at ``path`` (for suggesting keys)."""
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nxt = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if nxt is None:
            return None
        model = nxt
    return model


def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
    dotted = ".".join(str(p) for p in loc)
    msg = e["msg"]
    if e["type"] == "extra_forbidden" and loc:
        parent = _model_at(loc[:-1])
        hint = _suggest(str(loc[-1]), parent.model_fields) if parent else ""
        msg = f"unknown key{hint}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {dotted}: {msg}{more}" if dotted else f"{source}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with c parsed as a TOML value (bare words fall back to strings)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value (e.g. train.max_epoch=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"override {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {k} is not a table")
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Any problem raises RecipeError with one line."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{source}: cannot read: {exc}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise RecipeError(f"{source}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(source, exc)) from None


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if args:
        inner = [_type_name(a) for a in args]
        if origin in (Union, UnionType):
            return " \\| ".join("null" if i == "NoneType" else i for i in inner)
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(inner)}]"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """The recipe reference, generated from the models (README's table comes from here)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = (*prefix.rstrip(".").split("."), name) if prefix else (name,)
            sub = _model_at(path)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            ann = _type_name(field.annotation)
            desc = (field.description or "").replace("|", "\\|")
            dflt = json.dumps(default, default=str)
            lines.append(f"| `{prefix}{name}` | {ann} | `{dflt}` | {desc} |")

    walk(Recipe, "")
    return "\n".join(lines)
