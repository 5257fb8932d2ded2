"""Load local weights into a model: safetensors or a torch checkpoint, tolerant of the usual wrappers.

- ``module.`` (DDP / DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped;
- a ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoint is unwrapped;
- tensors whose shape differs (a head trained for another num_classes) are skipped and reported;
- a backbone-only file (keys like ``features.0.0.weight``) is matched under the model prefix where it fits
  best (e.g. ``net.backbone.``), so classification weights can initialise a detector's backbone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from accel_det.errors import WeightsError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    skipped: list[str] = field(default_factory=list)  # shape mismatch: "key: file (a, b) vs model (c, d)"
    prefix: str = ""

    def summary(self) -> str:
        parts = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.prefix:
            parts.append(f"under prefix {self.prefix!r}")
        for name, keys in (("skipped (shape)", self.skipped), ("missing", self.missing),
                           ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... (+{len(keys) - 5})" if len(keys) > 5 else "")
                parts.append(f"{name} {len(keys)}: {shown}")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types; name the file
        raise WeightsError(f"{p}: cannot read weights: {type(exc).__name__}: {exc}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{p}: not a state dict of tensors")
    return {_strip(k): v for k, v in sd.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
    return key


def _best_prefix(file_keys: list[str], model_keys: set[str]) -> str:
    """The model-key prefix under which most file keys exist ('' if direct names fit best)."""
    votes: Counter[str] = Counter()
    for mk in model_keys:
        for fk in file_keys:
            if mk.endswith("." + fk):
                votes[mk[: -len(fk)]] += 1
    direct = sum(k in model_keys for k in file_keys)
    if votes:
        prefix, n = votes.most_common(1)[0]
        if n > direct:
            return prefix
    return ""


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    sd = read_state_dict(path)
    target = model.state_dict()
    prefix = _best_prefix(list(sd), set(target))
    report = LoadReport(path=str(path), prefix=prefix)
    usable: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        mk = prefix + k
        if mk not in target:
            report.unexpected.append(k)
        elif target[mk].shape != v.shape:
            report.skipped.append(f"{mk}: file {tuple(v.shape)} vs model {tuple(target[mk].shape)}")
        else:
            usable[mk] = v
            report.loaded.append(mk)
    if not usable:
        raise WeightsError(f"{path}: no tensor matches the model ({len(sd)} in the file)")
    report.missing = [k for k in target if k not in usable]
    model.load_state_dict(usable, strict=False)
    return report
