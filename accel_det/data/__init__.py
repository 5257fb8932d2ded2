"""Datasets (VOC, COCO, YOLO, synthetic shapes), v2 transforms, collate and loaders built from a recipe."""

from .builder import (
    build_dataset,
    build_datasets,
    build_loaders,
    build_train_loader,
    build_val_loader,
    eval_transforms,
    seed_worker,
)
from .coco import COCODetection
from .collate import collate_fn
from .common import PROBLEM_KINDS, DatasetError, Problem
from .dataset import DetectionDataset, sample_seed
from .images import load_image
from .synthetic import make_synthetic_voc
from .transforms import build_transforms
from .voc import VOCDetection
from .yolo import YOLODetection

__all__ = [
    "COCODetection",
    "DatasetError",
    "DetectionDataset",
    "PROBLEM_KINDS",
    "Problem",
    "VOCDetection",
    "YOLODetection",
    "build_dataset",
    "build_datasets",
    "build_loaders",
    "build_train_loader",
    "build_val_loader",
    "build_transforms",
    "collate_fn",
    "eval_transforms",
    "load_image",
    "make_synthetic_voc",
    "sample_seed",
    "seed_worker",
]
