"""Datasets (VOC, COCO, YOLO, synthetic shapes), a mixed second set, v2 transforms, collate and loaders built
from a recipe."""

from .builder import (
    build_dataset,
    build_datasets,
    build_loaders,
    build_train_loader,
    build_val_loader,
    eval_splits,
    eval_transforms,
    train_transforms,
    worker_init,
)
from .coco import COCODetection
from .collate import collate_fn
from .common import PROBLEM_KINDS, DatasetError, Problem
from .dataset import DetectionDataset, StagedTransforms, sample_seed
from .images import load_image
from .mix import MixedDataset, MixSampler, mix_epoch_length
from .synthetic import make_synthetic_voc
from .transforms import AUGMENT_ORDER, LetterboxGeometry, build_transforms, to_original
from .voc import VOCDetection
from .yolo import YOLODetection

__all__ = [
    "AUGMENT_ORDER",
    "COCODetection",
    "DatasetError",
    "DetectionDataset",
    "LetterboxGeometry",
    "MixSampler",
    "MixedDataset",
    "PROBLEM_KINDS",
    "Problem",
    "StagedTransforms",
    "VOCDetection",
    "YOLODetection",
    "build_dataset",
    "build_datasets",
    "build_loaders",
    "build_train_loader",
    "build_val_loader",
    "build_transforms",
    "collate_fn",
    "eval_splits",
    "eval_transforms",
    "load_image",
    "make_synthetic_voc",
    "mix_epoch_length",
    "sample_seed",
    "worker_init",
    "to_original",
    "train_transforms",
]
