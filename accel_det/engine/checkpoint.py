"""Checkpoints that are never half-written: ``accelerator.save_state`` on every process into a temp dir,
renamed into place when whole, pointers moved only to complete checkpoints.

Layout under the run dir::

    checkpoints/epoch_0010/                   10 epochs done
    checkpoints/epoch_0010_step_00001234/     inside epoch 11, after optimizer step 1234 (output.checkpoint_every_steps
                                              or a SIGTERM); names sort in the order they were taken
        accelerate's files (model, optimizer, scaler, RNG of every process), recipe.json, and
        trainer_state.json, written last: its presence marks a complete checkpoint
    checkpoints/last, best                    one-line pointer files naming a checkpoint dir (no symlinks)

Save protocol (a collective): every process writes ``.NAME.tmp``; the main process adds recipe.json and
trainer_state.json, fsyncs every file, moves an older ``NAME`` (a re-save after resuming from an earlier
checkpoint) aside to ``.NAME.old-*``, renames the temp dir to ``NAME``, fsyncs the folder, and only then
moves the pointers. A crash leaves the old or the new complete ``NAME`` — or, between the two renames, none,
in which case ``resolve_checkpoint`` falls back to the newest complete checkpoint. Hidden ``.*`` dirs are
never read and are cleared by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from accel_det.errors import CheckpointError
from accel_det.jsonio import write_json_atomic

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MID_EPOCH = "_step_"


def checkpoint_name(epochs_done: int, global_step: int = 0, mid_epoch: bool = False) -> str:
    return f"epoch_{epochs_done:04d}{MID_EPOCH}{global_step:08d}" if mid_epoch else f"epoch_{epochs_done:04d}"


def _write_pointer(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the files themselves were synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Data on disk before the rename publishes it: after a power loss a renamed dir must not hold empty files."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        _fsync(file)
    _fsync(path)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("epoch_*") if p.is_dir() and is_complete(p))


def resolve_checkpoint(run_dir: Path, spec: str, notes: list[str] | None = None) -> Path | None:
    """``spec``: 'auto' (the newest complete checkpoint; None when there is none), 'last' / 'best' (the pointers
    in the run dir), or a path to a checkpoint dir. 'auto' does not trust the ``last`` pointer alone: a crash
    between a save's rename and the pointer's update leaves a newer complete checkpoint than it names; and a
    ``last`` whose checkpoint is missing falls back to the newest complete one, saying so in ``notes``."""
    root = run_dir / "checkpoints"
    if spec in ("last", "best", "auto"):
        pointer = root / ("last" if spec == "auto" else spec)
        path = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if spec != "best":
            found = complete_checkpoints(root)
            newest = found[-1] if found else None
            if spec == "auto":
                return newest
            if (path is None or not is_complete(path)) and newest is not None:
                if notes is not None and path is not None:
                    notes.append(f"{path} is not a complete checkpoint; using the newest complete one, {newest}")
                return newest
        if path is None:
            raise CheckpointError(f"{pointer}: no '{spec}' checkpoint in {run_dir}")
    else:
        path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def recover_interrupted_save(root: Path) -> list[str]:
    """Main process, before resolving: a crash while re-saving a checkpoint name, between moving the old copy
    aside and renaming the new one in, leaves the only complete copy hidden as ``.NAME.old-*``: put it back."""
    restored = []
    for old in sorted(root.glob(".epoch_*.old-*")) if root.is_dir() else []:
        name = old.name[1:].split(".old-", 1)[0]
        if is_complete(old) and not (root / name).exists():
            os.replace(old, root / name)
            restored.append(name)
    return restored


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


def _identity(recipe: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    model = recipe.get("model") or {}
    return {"model": model.get("name"), "backbone": model.get("backbone", ""), "classes": classes,
            "channels": model.get("channels", 3), "anchors": model.get("anchors")}


def check_same_model(where: Path, saved: dict[str, Any] | None, recipe: Any) -> None:
    """Refuse weights trained for another model, class list or order, or anchors, naming old and new.

    A permuted class list has the same head shape, so the weights load and every label silently means
    another class; another model or other anchors fail later with a state-dict or prior-count dump. The
    saved recipe is re-validated first, so one written before anchors were resolved compares equal."""
    if saved is None:
        return
    from pydantic import ValidationError

    try:
        validated = type(recipe).model_validate(saved)
        # what the model's outputs mean: one class when trained single-class, whatever names were read
        saved, saved_classes = validated.model_dump(mode="json"), validated.output_class_names
    except ValidationError:  # a recipe of an older schema: compare its raw fields
        saved_classes = (saved.get("data") or {}).get("class_names")
    old, new = _identity(saved, saved_classes), _identity(recipe.model_dump(mode="json"), recipe.output_class_names)
    if old["model"] != new["model"]:
        raise CheckpointError(f"{where}: checkpoint holds model {old['model']!r}, the recipe asks for "
                              f"{new['model']!r}")
    if old["backbone"] != new["backbone"]:
        was, now = old["backbone"] or "its own", new["backbone"] or "its own"
        raise CheckpointError(f"{where}: checkpoint holds a {old['model']} with backbone {was!r}, the recipe asks "
                              f"for {now!r} (model.backbone)")
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
    """``ema_module``: with ``[train.ema]``, its weights also go into each checkpoint as ``ema.safetensors``, the
    file ``evaluate``/``predict`` load (accelerate's own copy of the EMA state is for resuming)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, keep_last: int,
                 ema_module: torch.nn.Module | None = None) -> None:
        self.accelerator = accelerator
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.ema_module = ema_module

    def save(self, name: str, trainer_state: dict[str, Any], is_best: bool = False,
             recipe: dict[str, Any] | None = None) -> Path:
        """Collective: every process must call it (save_state writes each process's RNG state)."""
        acc = self.accelerator
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
            if self.ema_module is not None:
                from safetensors.torch import save_model

                save_model(self.ema_module, str(tmp / EMA_FILE))
            write_json_atomic(tmp / STATE_FILE, trainer_state)
            _fsync_tree(tmp)
            old = None
            if final.exists():
                old = self.root / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync(self.root)
            _write_pointer(self.root / "last", name)
            if is_best:
                _write_pointer(self.root / "best", name)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
        acc.wait_for_everyone()
        return final

    def update(self, name: str, fields: dict[str, Any], is_best: bool = False) -> None:
        """Record ``fields`` in checkpoint ``name``'s trainer state, e.g. an evaluation's outcome (the checkpoint
        is saved before it runs, so a failing evaluation loses nothing), and point ``best`` at it if it is.
        Main process only; any may call; nothing happens when there is no such checkpoint."""
        path = self.root / name
        if not self.accelerator.is_main_process or not is_complete(path):
            return
        write_json_atomic(path / STATE_FILE, {**read_trainer_state(path), **fields})
        if is_best:
            _write_pointer(self.root / "best", name)
        self._prune()

    def rewind(self, resume: Path, best_epoch: int | None) -> list[str]:
        """Collective. Resuming from a checkpoint older than the newest one: the newer ones belong to a timeline
        this run abandons. Move them aside to ``checkpoints/.abandoned-<time>/`` (kept for the user, never
        read), point ``last`` at the resume point and ``best`` at the checkpoint of ``best_epoch`` (or
        nowhere): otherwise ``best`` would name a checkpoint that the new timeline overwrites with other
        weights. Returns the names moved aside."""
        moved: list[str] = []
        if self.accelerator.is_main_process and resume.parent.resolve() == self.root.resolve():
            newer = [p for p in complete_checkpoints(self.root) if p.name > resume.name]
            if newer:
                aside = self.root / f".abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
                aside.mkdir()
                for path in newer:
                    os.replace(path, aside / path.name)
                    moved.append(path.name)
                _write_pointer(self.root / "last", resume.name)
                best = checkpoint_name(best_epoch) if best_epoch else None
                if best is not None and is_complete(self.root / best):
                    _write_pointer(self.root / "best", best)
                else:
                    (self.root / "best").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return moved

    def _prune(self) -> None:
        """Mid-epoch checkpoints exist for preemption: each goes once a newer checkpoint exists. Of the epoch
        checkpoints the newest ``keep_last`` stay. What ``last`` and ``best`` point to always stays."""
        keep = set()
        for ptr in ("last", "best"):
            p = self.root / ptr
            if p.is_file():
                keep.add(p.read_text(encoding="utf-8").strip())
        found = [p.name for p in complete_checkpoints(self.root)]
        epochs = [n for n in found if MID_EPOCH not in n]
        keep.update(found[-1:])
        keep.update(epochs if self.keep_last <= 0 else epochs[-self.keep_last:])
        for name in found:
            if name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)
        # what a crash left: temp dirs of saves that did not finish, old copies between the two renames
        for leftover in [*self.root.glob(".epoch_*.tmp"), *self.root.glob(".epoch_*.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

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
