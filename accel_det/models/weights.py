"""Load local weights into a model: safetensors or a torch checkpoint, tolerant of the usual wrappers.

- ``module.`` (DDP / DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped;
- a ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoint is unwrapped;
- tensors whose shape differs (a head trained for another num_classes) are skipped and reported;
- a backbone-only file (keys like ``features.0.0.weight``) is matched under the model prefix where it fits
  best (e.g. ``net.backbone.``), so classification weights can initialise a detector's backbone.
"""

from __future__ import annotations

import re
import warnings
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


_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy (pre-1.6) pickle
_UNPICKLER_MARK = "WeightsUnpickler error:"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _is_safetensors(path: Path) -> bool:
    """By content where it is unambiguous (a misnamed file still loads), else by the ``.safetensors`` suffix."""
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(_TORCH_MAGICS):
        return False
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:] == b"{":
        return True
    if path.suffix != ".safetensors":  # neither format's signature: say so rather than torch's parse error
        raise WeightsError(f"{path}: not a readable torch/safetensors weights file (unrecognised content)")
    return True


def _read_error(path: Path, exc: Exception) -> WeightsError:
    """One line for a file that torch/safetensors cannot read.

    torch's ``weights_only`` failures are a paragraph of advice (including "load with weights_only=False",
    which we never do: a pickle can run code); the cause is the text after "WeightsUnpickler error:".
    """
    msg = str(exc)
    if _UNPICKLER_MARK in msg:
        msg = msg.split(_UNPICKLER_MARK, 1)[1]
        found = _UNSUPPORTED_GLOBAL.search(msg)
        if found:
            # a real checkpoint that also pickles Python objects (argparse.Namespace, numpy scalars, ...)
            return WeightsError(
                f"{path}: the torch checkpoint holds a Python object that safe loading refuses "
                f"({found.group(1)}); save only the state_dict, or save it as .safetensors"
            )
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return WeightsError(f"{path}: not a readable torch/safetensors weights file ({reason})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors by key, wrappers and prefixes removed; :class:`WeightsError` (one line) otherwise."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    if p.stat().st_size == 0:
        raise WeightsError(f"{p}: empty file, not a torch/safetensors weights file")
    try:
        if _is_safetensors(p):
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():
                # "Detected pickle protocol N": noise on top of the one-line error a garbage file gets
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                # a file object, not the path: recent torch.load hands any *.safetensors path to safetensors
                with p.open("rb") as f:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt/truncated files raise many different types; name the file
        raise _read_error(p, exc) from None
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
    """Load what fits of ``path`` into ``model`` (see the module docstring); every error is one line."""
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
        # name one key of each side: a wrong file and a wrong prefix look alike until you see the keys
        hint = f"{len(sd)} in the file"
        if report.skipped:
            hint += f", {len(report.skipped)} by name but another shape, e.g. {report.skipped[0]}"
        elif sd:
            hint += f", e.g. {next(iter(sd))!r}; the model's are like {next(iter(target), '')!r}"
        raise WeightsError(f"{path}: no tensor matches the model ({hint})")
    report.missing = [k for k in target if k not in usable]
    try:
        model.load_state_dict(usable, strict=False)
    except RuntimeError as exc:  # torch's message is a header line plus one line per tensor
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise WeightsError(f"{path}: cannot load into the model: {'; '.join(lines[:3])}") from None
    return report
