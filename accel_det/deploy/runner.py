"""Run an exported file: onnxruntime for ``.onnx`` (CUDA provider when onnxruntime-gpu sees a GPU, else CPU),
the ``torch.export`` program for ``.pt2`` (CPU). Used by the export command's check and by ``predict``.

:class:`ExportedDetector` behaves like an eval-mode model of the detection contract: a float (N, C, H, W)
batch in [0, 1] in, ``list[{"boxes", "scores", "labels"}]`` out, the padding already dropped. A graph exported
with a fixed batch is fed in chunks of that size, the last one padded with blank images (an image's
detections never depend on its neighbours, so the padding changes nothing).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel_det.deploy import INPUT_NAME, OUTPUT_NAMES, ExportError, require
from accel_det.deploy.build import METADATA_KEY

EXPORTED_SUFFIXES = (".onnx", ".pt2")


def is_exported(path: str | Path) -> bool:
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def read_metadata(path: Path) -> dict[str, Any]:
    """The export's metadata: inside the file (ONNX metadata_props, .pt2 extra file), else ``<file>.json``."""
    text = None
    try:
        if path.suffix.lower() == ".onnx":
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
        else:
            with zipfile.ZipFile(path) as zf:
                found = [n for n in zf.namelist() if n.endswith(f"extra/{METADATA_KEY}.json")]
                text = zf.read(found[0]).decode("utf-8") if found else None
    except Exception as exc:  # a truncated or foreign file: one line naming it
        raise ExportError(f"{path}: not a readable {path.suffix} file: {exc}") from exc
    sidecar = path.with_name(path.name + ".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8")
    if text is None:
        raise ExportError(f"{path}: no accel_det metadata (not written by accel-det export, and no {sidecar.name})")
    meta = json.loads(text)
    for key in ("class_names", "img_dim", "channels", "letterbox", "input"):
        if key not in meta:
            raise ExportError(f"{path}: metadata lacks {key!r}")
    return meta


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for ``device`` (auto | cpu | cuda)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ExportError(f"onnxruntime has no CUDA provider here (available: {', '.join(available)}); install "
                          "onnxruntime-gpu")
    return ["CPUExecutionProvider"]


class ExportedDetector:
    """An exported detector file, callable like the eval-mode model."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such file")
        if self.path.suffix.lower() == ".onnx":
            require("onnx", "onnxruntime", what=f"{self.path}")
        self.meta = read_metadata(self.path)
        shape = self.meta["input"]["shape"]
        self.batch = shape[0] if isinstance(shape[0], int) else None  # None: dynamic
        if self.path.suffix.lower() == ".onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            try:
                self.session = ort.InferenceSession(str(self.path), opts, providers=onnx_providers(device))
            except Exception as exc:  # onnxruntime's own message, as one line
                raise ExportError(f"{self.path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from exc
            self.device = self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        else:
            import accel_det.deploy.nms  # noqa: F401  (registers accel_det::nms_keep, which the program calls)

            self.program = torch.export.load(str(self.path))
            self.module = self.program.module()
            self.device = "cpu"

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One call of the graph: (boxes, scores, labels, num_dets) as CPU tensors."""
        x = images.detach().to("cpu", torch.float32).contiguous()
        if hasattr(self, "session"):
            out = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
            return tuple(torch.from_numpy(np.asarray(o)) for o in out)
        with torch.no_grad():
            return tuple(t.cpu() for t in self.module(x))

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        n = images.shape[0]
        step = self.batch or n
        dets: list[dict[str, torch.Tensor]] = []
        for start in range(0, n, step):
            chunk = images[start:start + step]
            real = chunk.shape[0]
            if real < step:  # a fixed-batch graph: fill the last chunk with blank images
                chunk = torch.cat([chunk, chunk.new_zeros((step - real, *chunk.shape[1:]))])
            boxes, scores, labels, num = self.raw(chunk)
            for i in range(real):
                k = int(num[i])
                dets.append({"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k]})
        return dets
