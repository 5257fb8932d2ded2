"""Checkpoints: ``accelerator.save_state`` on every process into a temp dir, renamed into place when whole.

Layout under the run dir::

    checkpoints/epoch_0010/      accelerate state (model, optimizer, scheduler, RNG of every process)
                                 + trainer_state.json (written last: its presence marks a complete checkpoint)
    checkpoints/last, best       one-line text files naming an epoch dir (pointers, no symlinks)

A process killed mid-save leaves only ``.epoch_NNNN.tmp``, which is never read and is cleared next time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from accel_det.engine.distributed import write_json_atomic
from accel_det.errors import CheckpointError

STATE_FILE = "trainer_state.json"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _write_pointer(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def resolve_checkpoint(run_dir: Path, spec: str) -> Path | None:
    """``spec``: 'last' / 'best' (pointers in the run dir), or a path to a checkpoint dir."""
    root = run_dir / "checkpoints"
    if spec in ("last", "best", "auto"):
        pointer = root / ("last" if spec == "auto" else spec)
        if not pointer.is_file():
            if spec == "auto":
                return None
            raise CheckpointError(f"{pointer}: no '{spec}' checkpoint in {run_dir}")
        path = root / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state: {exc}") from None


def read_checkpoint_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe a checkpoint (or a run dir) was saved with: ``recipe.json`` inside it; None if it has none."""
    file = path / "recipe.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable recipe: {exc}") from None
    return data if isinstance(data, dict) else None


def _identity(recipe: dict[str, Any]) -> dict[str, Any]:
    model, data = recipe.get("model") or {}, recipe.get("data") or {}
    return {"model": model.get("name"), "classes": data.get("class_names"), "channels": model.get("channels", 3),
            "anchors": model.get("anchors")}


def check_same_model(where: Path, saved: dict[str, Any] | None, recipe: Any) -> None:
    """Refuse weights trained for another model, class list or order, or anchors, naming old and new.

    A permuted class list has the same head shape, so the weights load and every label silently means
    another class; another model or other anchors fail later with a state-dict or prior-count dump. The
    saved recipe is re-validated first, so one written before anchors were resolved compares equal."""
    if saved is None:
        return
    from pydantic import ValidationError

    try:
        saved = type(recipe).model_validate(saved).model_dump(mode="json")
    except ValidationError:
        pass  # a recipe of an older schema: compare its raw fields
    old, new = _identity(saved), _identity(recipe.model_dump(mode="json"))
    if old["model"] != new["model"]:
        raise CheckpointError(f"{where}: checkpoint holds model {old['model']!r}, the recipe asks for "
                              f"{new['model']!r}")
    if old["classes"] != new["classes"]:
        what = "the same classes in another order" if sorted(old["classes"] or []) == sorted(new["classes"]) else (
            "other classes")
        raise CheckpointError(f"{where}: checkpoint holds classes {old['classes']}, the recipe asks for "
                              f"{new['classes']} ({what}: labels would silently mean other classes)")
    if old["channels"] != new["channels"]:
        raise CheckpointError(f"{where}: checkpoint holds a model for {old['channels']}-channel images, the "
                              f"recipe asks for {new['channels']} (model.channels)")
    if old["anchors"] is not None and new["anchors"] is not None and old["anchors"] != new["anchors"]:
        keys = [k for k in new["anchors"] if old["anchors"].get(k) != new["anchors"][k]]
        k = keys[0] if keys else "anchors"
        raise CheckpointError(f"{where}: checkpoint holds model.anchors.{k} = {old['anchors'].get(k)}, the "
                              f"recipe asks for {new['anchors'].get(k)}")


class Checkpointer:
    def __init__(self, accelerator: Accelerator, run_dir: Path, keep_last: int) -> None:
        self.accelerator = accelerator
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last

    def save(self, epoch: int, trainer_state: dict[str, Any], is_best: bool,
             recipe: dict[str, Any] | None = None) -> Path:
        """Collective: every process must call it (save_state writes each process's RNG state)."""
        acc = self.accelerator
        name = epoch_dir_name(epoch)
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if recipe is not None:  # each checkpoint says what model it holds, whatever the run dir says later
                write_json_atomic(tmp / "recipe.json", recipe)
            write_json_atomic(tmp / STATE_FILE, trainer_state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_pointer(self.root / "last", name)
            if is_best:
                _write_pointer(self.root / "best", name)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        keep = set()
        for ptr in ("last", "best"):
            p = self.root / ptr
            if p.is_file():
                keep.add(p.read_text(encoding="utf-8").strip())
        epochs = sorted(p.name for p in self.root.glob("epoch_*") if p.is_dir())
        keep.update(epochs[-self.keep_last:])
        for name in epochs:
            if name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def load(self, path: Path) -> dict[str, Any]:
        state = read_trainer_state(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as exc:  # noqa: BLE001
            # a truncated/corrupt file (safetensors, pickle and torch each raise their own types) or a
            # checkpoint of another model: re-raised as one line naming the checkpoint, never swallowed
            lines = str(exc).strip().splitlines() or [""]
            more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
            raise CheckpointError(f"{path}: cannot load checkpoint: {type(exc).__name__}: {lines[0]}{more}") from None
        return state
