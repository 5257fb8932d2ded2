"""The ``[data]`` table and its sub-tables (``[data.synthetic]``, ``[data.mix]``, ``[[data.stages]]``).

Torch-free, like the rest of the schema (config.py re-exports these models). Defaults that depend on other
keys (the mix's root/format/splits, a stage's augments) are resolved by validators, so ``recipe.json`` records
the values the run really used.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Annotated, Literal, get_args

from pydantic import Field, Strict, field_validator, model_validator

from accel_det.config_types import KeyedError, NonNegInt, PosInt, StrictBool, StrictInt, Table
from accel_det.errors import DataError
from accel_det.hf_local import class_names_of

# The training augments by name; data/transforms.py applies them in this order whatever the recipe's order.
# "mosaic" (data/mosaic.py) is dataset-level: four training images in one (YOLOv4), training only.
Augment = Literal[
    "mosaic", "photometric", "color_jitter", "grayscale", "zoom_out", "iou_crop", "scale_jitter", "hflip", "vflip"
]
AUGMENTS: tuple[str, ...] = get_args(Augment)
DataFormat = Literal["voc", "coco", "yolo", "hf", "synthetic"]
OpenUnit = Annotated[float, Strict(), Field(gt=0, lt=1)]  # (0, 1): a probability that must mix something


class SyntheticConfig(Table):
    num_train: PosInt = Field(320, description="Synthetic training images")
    num_val: PosInt = Field(64, description="Synthetic validation images")
    img_size: PosInt = Field(128, description="Synthetic image size (px)")
    max_objects: PosInt = Field(4, description="At most this many shapes per image")
    seed: StrictInt = Field(0, description="Generator seed: same seed, same images")


class MixConfig(Table):
    """A second dataset mixed into training (and evaluated on its own as ``val2``). Keys left out take
    ``[data]``'s values; the class names, ``keep_difficult``, ``on_bad_sample`` and ``ignore_classes`` are
    always ``[data]``'s."""

    rate: OpenUnit = Field(
        description="Probability that a training sample comes from this second set (an epoch is "
        "len(data.train) / (1 - rate) samples: the first set is seen about once per epoch)"
    )
    format: DataFormat | None = Field(None, description="Layout of the second set; default data.format")
    root: str | None = Field(None, description="Folder of the second set; default data.root")
    train: str | None = Field(
        None, description="Its training split, like data.train; default data.train (when the format is the same)"
    )
    val: str | None = Field(
        None, description="Its validation split, evaluated as 'val2'; default data.val (when the format is the same)"
    )
    train_images: str | None = Field(None, description="coco: image folder of its train JSON; default data's")
    val_images: str | None = Field(None, description="coco: image folder of its val JSON; default data's")


class StageConfig(Table):
    epochs: PosInt = Field(
        description="Epochs the stage lasts; the last stage also runs every epoch after the stages' sum"
    )
    augments: list[Augment] | None = Field(
        None, description="Training augments of the stage (like data.augments; [] = the resize only); "
        "default data.augments"
    )


class DataConfig(Table):
    format: DataFormat = Field("synthetic", description="Dataset layout")
    root: str = Field("data/synthetic_shapes", description="Dataset folder (relative to the working dir)")
    train: str = Field(
        "ImageSets/Main/train.txt",
        description="voc: split file ('' = all); coco: instances JSON; yolo: image dir or list file; hf: split "
        "name of a save_to_disk DatasetDict at root, or a save_to_disk folder, .parquet/.arrow file(s) or glob",
    )
    val: str = Field("ImageSets/Main/val.txt", description="Like train, for the validation split")
    train_images: str = Field("", description="coco: image folder of the train JSON (relative to root)")
    val_images: str = Field("", description="coco: image folder of the val JSON (relative to root)")
    class_names: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        description="Class names; their order defines labels 1..K. hf: [] takes the names of the train split's "
        "ClassLabel (objects.category), less data.ignore_classes (the dataset must then exist at validation)",
    )
    batch_size: PosInt = Field(16, description="Images per process per step")
    num_workers: NonNegInt = Field(2, description="DataLoader workers per process")
    augments: list[Augment] = Field(
        default_factory=lambda: ["hflip"],
        description="Training augments (torchvision.transforms.v2), applied in the order listed in the type; "
        "'mosaic': sample i and three random others in one image (YOLOv4), then the rest as on any image; close "
        "it for the last epochs with [[data.stages]]",
    )
    letterbox: StrictBool = Field(
        False, description="Keep the aspect ratio and pad to a square img_dim (mean colour), in training and "
        "eval; false stretches to the square"
    )
    keep_difficult: StrictBool = Field(False, description="voc: train on boxes marked difficult")
    on_bad_sample: Literal["skip", "error"] = Field(
        "skip", description="Bad image or annotation entry: 'skip' (drop or replace it, counted) or 'error'"
    )
    ignore_classes: list[str] = Field(default_factory=list, description="voc/coco/hf: drop objects of these classes")
    single_cls: StrictBool = Field(
        False, description="Train every object as one class, single_cls_name (annotations are still read and "
        "checked with class_names); model.num_classes becomes 1"
    )
    single_cls_name: str = Field("object", description="single_cls: the name of the one class")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    mix: MixConfig | None = Field(None, description="A second training set mixed in at mix.rate (see its keys)")
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="[[data.stages]]: training augments per span of epochs, in order; empty: data.augments "
        "throughout",
    )

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names: {', '.join(dup)}")
        return v

    @field_validator("single_cls_name")
    @classmethod
    def _one_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty name (it names the class in tables and predictions)")
        return v

    @model_validator(mode="after")
    def _names_from_dataset(self) -> DataConfig:
        """``class_names = []`` with format "hf": the train split's ClassLabel names, read now (from JSON or a
        schema, no rows), so that recipe.json, num_classes and the resume checks see the real names."""
        if self.class_names:
            return self
        if self.format != "hf":
            raise KeyedError("class_names", "needs at least one class name ([] reads them from the dataset with "
                             "format = 'hf' only)")  # fmt: skip
        try:
            names = class_names_of(self.root, self.train)
        except DataError as exc:
            raise KeyedError("class_names", f"[] takes the dataset's ClassLabel names, but {exc}") from None
        kept = [n for n in names if n not in self.ignore_classes]
        if not kept:
            raise KeyedError("class_names", f"every ClassLabel name of the dataset ({', '.join(names)}) is in "
                             "data.ignore_classes")  # fmt: skip
        # already a valid value: assignment would re-run every validator of the table
        self.__dict__["class_names"] = kept
        return self

    @model_validator(mode="after")
    def _coco_only(self) -> DataConfig:
        if self.format != "coco" and (self.train_images or self.val_images):
            raise ValueError("train_images/val_images apply only to format = 'coco'")
        return self

    @model_validator(mode="after")
    def _ignored(self) -> DataConfig:
        both = [n for n in self.ignore_classes if n in self.class_names]
        if both:
            raise KeyedError(
                "ignore_classes", f"{', '.join(both)} also in data.class_names: a class is trained or ignored"
            )
        if self.ignore_classes and self.format == "yolo":
            # YOLO labels are positions in class_names: an ignored name has no id to match
            raise KeyedError("ignore_classes", "applies to formats voc and coco (YOLO class ids index class_names)")
        return self

    @model_validator(mode="after")
    def _resolve_mix(self) -> DataConfig:
        mix = self.mix
        if mix is None:
            return self
        fmt = mix.format or self.format
        same = fmt == self.format
        for key in ("train", "val"):
            # a split path means something else in another layout (a VOC list file is no COCO JSON)
            if getattr(mix, key) is None and not same:
                raise KeyedError(f"mix.{key}", f"needs a value: data.mix.format ({fmt!r}) differs from "
                                 f"data.format ({self.format!r})")  # fmt: skip
        resolved = {
            "format": fmt,
            "root": self.root if mix.root is None else mix.root,
            "train": self.train if mix.train is None else mix.train,
            "val": self.val if mix.val is None else mix.val,
        }
        for key in ("train_images", "val_images"):
            given = getattr(mix, key)
            resolved[key] = given if given is not None else (getattr(self, key) if same else "")
        if fmt != "coco" and (resolved["train_images"] or resolved["val_images"]):
            raise KeyedError("mix", "train_images/val_images apply only to format = 'coco'")
        if fmt == "yolo" and self.ignore_classes:
            raise KeyedError("mix.format", "yolo cannot apply data.ignore_classes (YOLO class ids index class_names)")
        # already validated values of the declared types: no need to go through validate_assignment
        mix.__dict__.update(resolved)
        return self

    @model_validator(mode="after")
    def _resolve_stages(self) -> DataConfig:
        for stage in self.stages:
            if stage.augments is None:
                stage.__dict__["augments"] = list(self.augments)
        return self

    def stage_starts(self) -> list[int]:
        """The first (0-based) epoch of each stage."""
        starts, at = [], 0
        for stage in self.stages:
            starts.append(at)
            at += stage.epochs
        return starts

    def stage_of(self, epoch: int) -> tuple[int, list[str]]:
        """(index in ``stages``, its augments) of ``epoch``, 0-based as the trainer passes it to ``set_epoch``.

        The last stage runs on past the stages' sum of epochs: a shorter ``train.max_epoch`` (a quick run)
        simply never reaches the later stages, a longer one stays in the last. Without stages: (0,
        ``augments``) for every epoch."""
        if not self.stages:
            return 0, list(self.augments)
        i = max(bisect_right(self.stage_starts(), epoch) - 1, 0)
        return i, list(self.stages[i].augments or [])
