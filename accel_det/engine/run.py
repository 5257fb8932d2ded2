"""Open a finished (or running) run for ``evaluate``, ``predict`` and ``export``: the one way to get its recipe,
resolve which weights to use, check they hold the recipe's model, and build that model with them loaded.

``--checkpoint`` takes a keyword first (``best`` -> ``last`` -> the run's ``model.safetensors``), then a
path (a checkpoint dir or a weights file): a file that happens to be called ``best`` in the working directory
is never mistaken for the keyword.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from accel_det.config import Recipe
from accel_det.config_io import load_recipe, parse_override
from accel_det.engine.checkpoint import check_same_model, is_complete, read_checkpoint_recipe, resolve_checkpoint
from accel_det.errors import CheckpointError, UsageError, WeightsError

KEYWORDS = ("best", "last")
# a checkpoint's EMA weights first (what the run evaluated and kept as best), then accelerate's model file
WEIGHT_FILES = ("ema.safetensors", "model.safetensors", "pytorch_model.bin")


@dataclass
class Weights:
    path: Path  # the weights file
    tag: str  # what was asked and found: best, last, epoch_0003, final, or <file stem>-<path hash>
    checkpoint: Path | None = None  # the checkpoint dir the file belongs to
    note: str = ""  # how a keyword was resolved, when not the obvious way


@dataclass
class OpenedRun:
    run_dir: Path
    recipe: Recipe
    weights: Weights
    model: nn.Module  # on the CPU, weights loaded, eval mode
    overrides: tuple[str, ...] = ()

    def result_tag(self) -> str:
        """Names result files after what was evaluated, plus a short hash of the overrides when there are
        any, so that no two different evaluations overwrite each other's files."""
        if not self.overrides:
            return self.weights.tag
        return f"{self.weights.tag}_{_short_hash(' '.join(self.overrides))}"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]


def run_recipe(run_dir: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The run's resolved recipe (``recipe.json``) with ``overrides``; ``model.weights`` and
    ``model.backbone_weights`` are cleared because the weights come from the checkpoint."""
    path = run_dir / "recipe.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a run dir (no recipe.json)")
    saved = read_checkpoint_recipe(run_dir) or {}
    trained = (saved.get("model") or {}).get("name")
    for text in overrides:
        keys, value = parse_override(text)
        # before validation: the run's recipe.json holds the trained model's resolved anchors, which would
        # fail against another model and hide what is really asked
        if keys == ["model", "name"] and value != trained:
            raise CheckpointError(f"{run_dir}: the run holds model {trained!r}, the override asks for {value!r}")
    return load_recipe(path, [*overrides, "model.weights=''", "model.backbone_weights=''"])


def _in_checkpoint(ckpt: Path, tag: str, note: str = "") -> Weights:
    for name in WEIGHT_FILES:
        if (ckpt / name).is_file():
            return Weights(ckpt / name, tag, ckpt, note)
    raise CheckpointError(f"{ckpt}: checkpoint holds no model weights ({' or '.join(WEIGHT_FILES)})")


def resolve_weights(run_dir: Path, spec: str) -> Weights:
    """``best`` | ``last`` | a checkpoint dir | a weights file -> the weights file and what it is."""
    root = run_dir / "checkpoints"
    if spec in KEYWORDS:
        note = ""
        if spec == "best":
            if (root / "best").is_file():
                return _in_checkpoint(_resolved(run_dir, "best"), "best")
            note = "no 'best' checkpoint (no evaluation marked one): using 'last'"
        if (root / "last").is_file():
            return _in_checkpoint(_resolved(run_dir, "last"), "last", note)
        final = run_dir / "model.safetensors"
        if final.is_file():
            return Weights(final, "final", None, f"no checkpoints: using {final.name}")
        raise CheckpointError(f"{run_dir}: no checkpoint and no model.safetensors (has it trained an epoch?)")
    path = Path(spec)
    if path.is_dir():
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no trainer_state.json)")
        return _in_checkpoint(path, _checkpoint_tag(run_dir, path))
    if path.is_file():
        if is_complete(path.parent) and path.name in WEIGHT_FILES:
            return Weights(path, _checkpoint_tag(run_dir, path.parent), path.parent)
        if path.resolve() == (run_dir / "model.safetensors").resolve():
            return Weights(path, "final")
        return Weights(path, f"{path.stem}-{_short_hash(str(path.resolve()))}")
    raise UsageError(f"--checkpoint {spec}: no such file or checkpoint (use best, last, a checkpoint dir or a "
                     "weights file)")


def _checkpoint_tag(run_dir: Path, ckpt: Path) -> str:
    """A checkpoint's name; one of another run also gets a hash of its path (its epoch_0002 is not ours)."""
    if ckpt.resolve().parent == (run_dir / "checkpoints").resolve():
        return ckpt.name
    return f"{ckpt.name}-{_short_hash(str(ckpt.resolve()))}"


def _resolved(run_dir: Path, keyword: str) -> Path:
    path = resolve_checkpoint(run_dir, keyword)
    assert path is not None  # only 'auto' may resolve to nothing
    return path


def _saved_recipe(run_dir: Path, weights: Weights) -> dict[str, Any] | None:
    # the checkpoint's own recipe; for a weights file, the recipe.json beside it (another run's final
    # model.safetensors); else (a checkpoint older than its own recipe.json) the run's
    saved = read_checkpoint_recipe(weights.checkpoint or weights.path.parent)
    return saved if saved is not None else read_checkpoint_recipe(run_dir)


def open_run(run_dir: Path, checkpoint: str = "best", overrides: Sequence[str] = ()) -> OpenedRun:
    """Recipe (+ overrides), weights, and the model with them loaded; refuses weights of another model,
    class list or order, or anchors, and weights that do not fit the model."""
    from accel_det.models import build_model, load_weights

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir, overrides)
    weights = resolve_weights(run_dir, checkpoint)
    check_same_model(weights.checkpoint or weights.path, _saved_recipe(run_dir, weights), recipe)
    model, _ = build_model(recipe)
    report = load_weights(model, weights.path)
    if report.skipped or report.missing:
        raise WeightsError(f"{weights.path}: does not fit the run's model: {report.summary()}")
    model.eval()
    return OpenedRun(run_dir, recipe, weights, model, tuple(overrides))
