"""Trace a detector's graph once with ``torch.export`` and write it as ONNX or as a ``.pt2`` program, with the
metadata a deployment needs.

One exporter for both formats: ``torch.export`` (the dynamo path) gives an ``ExportedProgram`` that is saved as
is for ``pt2`` and translated by ``torch.onnx.export(program, dynamo=True)`` for ONNX, so the two files hold
the same graph. The TorchScript exporter is deprecated in torch 2.x and traces Python control flow into
constants; the dynamo path keeps the batch (and the native models' H, W) symbolic and lets the NMS op carry
an explicit ONNX translation (deploy/nms.py).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

import accel_det
from accel_det.deploy import FORMATS, INPUT_NAME, OUTPUT_NAMES, ExportError
from accel_det.deploy.anchor_free import AnchorFreeGraph
from accel_det.deploy.native import NativeGraph
from accel_det.deploy.nms import ONNX_TRANSLATIONS
from accel_det.deploy.zoo import ZooGraph
from accel_det.models.anchor_free import AnchorFreeDetector
from accel_det.models.native import AnchorDetector

DEFAULT_OPSET = 18  # the dynamo exporter's own; lower ones go through onnx's version converter
MAX_SIDE = 8192  # the largest H, W a --dynamic-size graph accepts
METADATA_KEY = "accel_det"  # ONNX metadata_props key and .pt2 extra file holding the metadata JSON


def build_graph(model: nn.Module, recipe: Any, dynamic_size: bool) -> nn.Module:
    """The exportable wrapper of a run's model (eval mode, on the CPU)."""
    name, dim = recipe.model.name, recipe.model.img_dim
    if isinstance(model, AnchorDetector):
        if dynamic_size and dim <= max(model.priors.steps):
            raise ExportError(f"{name}: --dynamic-size needs model.img_dim > the largest stride "
                              f"{max(model.priors.steps)} (export traces feature maps of at least 2x2)")
        graph: nn.Module = NativeGraph(model, recipe.num_classes, (dim, dim), dynamic_size)
    elif isinstance(model, AnchorFreeDetector):
        if dynamic_size and dim <= max(model.net.strides):
            raise ExportError(f"{name}: --dynamic-size needs model.img_dim > the largest stride "
                              f"{max(model.net.strides)} (export traces feature maps of at least 2x2)")
        graph = AnchorFreeGraph(model, recipe.num_classes)
    else:
        if dynamic_size:
            raise ExportError(f"{name}: --dynamic-size is for the native models; torchvision detectors are "
                              "exported at model.img_dim (their resize and anchors are fixed at export)")
        graph = ZooGraph(model, name, recipe.num_classes, dim)
    return graph.eval()


def min_side(graph: nn.Module) -> int:
    """The smallest H, W a dynamic-size graph takes: every feature map at least 2x2 (torch.export specialises
    size-1 dims, so smaller inputs are refused by the exported program rather than computed wrongly)."""
    if isinstance(graph, AnchorFreeGraph):
        return max(graph.strides) + 1
    assert isinstance(graph, NativeGraph) and graph.graph_priors is not None
    return max(graph.graph_priors.steps) + 1


def export_program(graph: nn.Module, name: str, channels: int, img_dim: int, batch: int | None,
                   dynamic_size: bool) -> torch.export.ExportedProgram:
    """``torch.export`` the graph: batch dynamic (``batch`` None) or fixed, H and W fixed at img_dim or dynamic."""
    example_batch = batch or 2  # never 1 when dynamic: torch.export would specialise a size-1 batch
    h = w = img_dim
    shapes: dict[int, Any] = {}
    if batch is None:
        shapes[0] = torch.export.Dim("N", min=1, max=4096)
    if dynamic_size:
        lo = min_side(graph)
        # a non-square example: equal example sizes could let the tracer tie H to W
        h, w = max(img_dim, lo), max(img_dim, lo) + lo
        shapes[2], shapes[3] = torch.export.Dim("H", min=lo, max=MAX_SIDE), torch.export.Dim("W", min=lo, max=MAX_SIDE)
    example = torch.rand(example_batch, channels, h, w, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return torch.export.export(graph, (example,), dynamic_shapes={"images": shapes or None}, strict=False)
    except Exception as exc:  # any exporter failure becomes one line naming the model
        raise ExportError(f"{name}: torch.export failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def metadata(opened: Any, fmt: str, batch: int | None, dynamic_size: bool, graph: nn.Module,
             opset: int | None) -> dict[str, Any]:
    """What a deployment needs to feed the graph and read its outputs, and where it came from."""
    recipe, model = opened.recipe, opened.model
    if isinstance(model, AnchorDetector | AnchorFreeDetector):
        mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
    else:
        mean, std = list(model.transform.image_mean), list(model.transform.image_std)
    dim, c = recipe.model.img_dim, recipe.model.channels
    versions = {"accel_det": accel_det.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if fmt == "onnx":
        import onnx

        versions["onnx"] = onnx.__version__
    side: Any = "H" if dynamic_size else dim
    return {
        "format": fmt,
        "model": recipe.model.name,
        "class_names": recipe.output_class_names,  # label i is class_names[i - 1]
        "num_classes": recipe.num_classes,
        "img_dim": dim,
        "channels": c,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch or "N", c, side, "W" if dynamic_size else dim],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW, RGB" if c == 3 else "NCHW",
            "dynamic_batch": batch is None,
            "dynamic_size": dynamic_size,
            "min_side": min_side(graph) if dynamic_size else dim,
            "max_side": MAX_SIDE if dynamic_size else dim,
        },
        # applied inside the graph: feed [0, 1] pixels, not normalised ones
        "normalisation": {"mean": mean, "std": std, "in_graph": True},
        "letterbox": bool(recipe.data.letterbox),
        "resize": "letterbox (scale to fit, pad centred with the mean colour)" if recipe.data.letterbox
        else "stretch to img_dim x img_dim",
        "outputs": {
            "boxes": "(N, max_det, 4) float32 xyxy, input pixels",
            "scores": "(N, max_det) float32, sorted descending",
            "labels": "(N, max_det) int64 in 1..K (class_names[label - 1]); 0 in padding",
            "num_dets": "(N,) int64: the first num_dets rows of each image are detections, the rest zeros",
        },
        "conf_thres": float(graph.conf_thres),
        "iou_thres": float(graph.iou_thres),
        "max_det": int(graph.max_det),
        # candidates before NMS: native, the top pre_nms_topk (prior, class) pairs of an image; torchvision, the top
        # topk_candidates per class (SSD) or per feature level (RetinaNet, FCOS)
        "pre_nms_topk": getattr(graph, "pre_nms_topk", None),
        "topk_candidates": getattr(graph, "topk", None),
        "opset": opset if fmt == "onnx" else None,
        "weights": str(opened.weights.path),
        "checkpoint": opened.weights.tag,
        "overrides": list(opened.overrides),
        "versions": versions,
    }


def write(program: torch.export.ExportedProgram, path: Path, fmt: str, meta: dict[str, Any], opset: int) -> None:
    """Write the program as ``fmt`` at ``path`` (and the metadata beside it as ``<path>.json``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: torch.export.save warns about a .pt2 archive named otherwise
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    text = json.dumps(meta, indent=2)
    if fmt == "pt2":
        torch.export.save(program, str(tmp), extra_files={f"{METADATA_KEY}.json": text})
    else:
        _write_onnx(program, tmp, meta, opset, text)
    tmp.replace(path)
    sidecar = path.with_name(path.name + ".json")
    sidecar.write_text(text + "\n", encoding="utf-8")


def _write_onnx(program: torch.export.ExportedProgram, path: Path, meta: dict[str, Any], opset: int,
                text: str) -> None:
    import onnx

    try:
        onnx_program = torch.onnx.export(
            program, f=None, dynamo=True, opset_version=opset, custom_translation_table=ONNX_TRANSLATIONS,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), optimize=True, verbose=False,
        )
        assert onnx_program is not None
        onnx_program.save(str(path), external_data=False)
    except Exception as exc:  # any exporter failure becomes one line naming the model
        raise ExportError(f"{meta['model']}: the ONNX exporter failed (opset {opset}): {_first_line(exc)}") from exc
    proto = onnx.load(str(path))
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:  # the exporter falls back to its own opset when onnx's version converter gives up
        raise ExportError(f"{meta['model']}: ONNX opset {opset} is out of reach (the converter stopped at {got}); "
                          f"use --opset 16..23")
    _name_dims(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, text
    proto.producer_name = "accel_det"
    onnx.save(proto, str(path))


def _name_dims(proto: Any) -> None:
    """The exporter names symbolic dims s0, s1, ...; call them N, H, W as the contract does."""
    names = {}
    for axis, label in ((0, "N"), (2, "H"), (3, "W")):
        dim = proto.graph.input[0].type.tensor_type.shape.dim[axis]
        if dim.dim_param:
            names[dim.dim_param] = label
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
