"""Export a detector to a self-contained graph (ONNX, ``torch.export`` .pt2) and run that graph.

The graph's contract is in docs/architecture.md (Contracts, Export): ``images`` float32 (N, C, H, W) in [0, 1]
-> ``boxes`` (N, max_det, 4), ``scores`` (N, max_det), ``labels`` (N, max_det) int64 1..K, ``num_dets`` (N,),
with decode, score threshold and per-class NMS inside. Modules: ``nms`` (the NMS op and the padded selection
every wrapper ends with), ``native`` and ``zoo`` (the graph wrappers), ``build`` (trace, write, metadata),
``runner`` (run an exported file), ``compare`` (exported vs eager, detection by detection), ``check`` (the
export command's proof on val images).

This package's ``__init__`` imports nothing heavy: the CLI imports :class:`ExportError` without torch.
"""

from __future__ import annotations

from accel_det.errors import AccelDetError

# the names of the graph's input and outputs (the contract; runner and predict read them)
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_dets")
FORMATS = ("onnx", "pt2")


class ExportError(AccelDetError):
    """A model that cannot be exported, an exporter failure, or an exported graph that disagrees with eager."""


def require(*modules: str, what: str) -> None:
    """One line instead of an ImportError deep in an exporter when the ``export`` extra is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}: pip install 'accel-det[export]'")


__all__ = ["FORMATS", "INPUT_NAME", "OUTPUT_NAMES", "ExportError", "require"]
