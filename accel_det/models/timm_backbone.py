"""``model.backbone = "timm:<name>"``: a timm feature extractor under a native head (SSD-lite, FaceBoxes).

timm is optional (``pip install accel-det[timm]``) and imported only here, when such a model is built. The
net is ``timm.create_model(name, features_only=True, pretrained=False)``: timm never downloads anything;
weights come from a local file, ``model.backbone_weights`` (:func:`load_backbone_weights`). The head taps
the levels ``accel_det.catalog.head_taps`` picks from the reductions timm reports, so the strides and
channels are timm's own (validation derives the same strides from the catalog's table, torch-free).

``model.recompute`` runs stage by stage only on timm's generic ``FeatureListNet`` (resnets, regnets,
convnexts, ...): accel_det then runs its modules itself, one stage per feature level, through
``run_stage`` (which keeps BatchNorm's statistics from being updated twice). Nets timm builds with their
own feature class (MobileNetV3, EfficientNet) run as one call and have no stages.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import nn

from accel_det.catalog import head_taps, timm_model_name
from accel_det.errors import RecipeError, WeightsError
from accel_det.models.recompute import run_stage
from accel_det.models.weights import LoadReport, read_state_dict


def import_timm(backbone: str) -> ModuleType:
    try:
        import timm
    except ImportError:
        raise RecipeError(f"model.backbone: {backbone!r} needs the timm package: pip install accel-det[timm]") from None
    return timm


def create_features(backbone: str, channels: int = 3, out_indices: Sequence[int] | None = None) -> nn.Module:
    """timm's ``features_only`` net for ``backbone`` ("timm:<name>"), without weights; one-line errors."""
    timm = import_timm(backbone)
    name = timm_model_name(backbone)
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise RecipeError(f"model.backbone: {backbone!r} is not a timm model{hint}")
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": False, "in_chans": channels}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:  # e.g. no features_only
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"model.backbone: timm cannot build {name!r} as a feature extractor: {first}") from None


def _stages(body: nn.Module) -> list[list[str]]:
    """The modules of timm's FeatureListNet/FeatureDictNet grouped by feature level (each group ends at a
    returned layer); [] for a net timm builds with its own feature class."""
    from timm.models import FeatureDictNet

    if not isinstance(body, FeatureDictNet):
        return []
    stages: list[list[str]] = [[]]
    for name in body.keys():
        stages[-1].append(name)
        if name in body.return_layers:
            stages.append([])
    return stages[:-1]  # FeatureDictNet keeps no module after the last returned layer


class TimmBackbone(nn.Module):
    """A timm ``features_only`` net returning the maps a native head predicts on (``taps``), NCHW.

    ``out_channels``/``strides`` describe those maps (the heads and the priors read them), ``norm`` the
    mean/std of timm's pretrained config (the input normalisation its weights expect).
    """

    def __init__(self, backbone: str, head: str, channels: int = 3) -> None:
        super().__init__()
        body = create_features(backbone, channels)
        reductions = tuple(body.feature_info.reduction())
        try:
            taps = head_taps(head, reductions)
        except ValueError as exc:
            raise RecipeError(f"model.backbone: {backbone}: {exc}") from None
        if taps[-1] < len(reductions) - 1:
            # levels past the last tap: their parameters would get no gradient, which DDP refuses
            body = create_features(backbone, channels, range(taps[-1] + 1))
        self.body = body
        self.spec = backbone
        self.taps = taps
        self.strides = [reductions[i] for i in taps]
        self.out_channels = [body.feature_info.channels()[i] for i in taps]
        self.nhwc = getattr(body, "output_fmt", "NCHW") == "NHWC"  # timm's Format is a str enum
        cfg = getattr(body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        self.norm = (tuple(mean), tuple(std)) if mean and std and len(mean) == channels == len(std) else None
        self.stages = _stages(body)
        self.stage_names = tuple(body.feature_info.module_name()) if self.stages else ()
        self.recompute = 0  # the first N stages are recomputed in backward (models/recompute.py)

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        # modules looked up per call: a SyncBatchNorm conversion replaces them after __init__
        for name in names:
            x = self.body[name](x)
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = (x.shape[-2], x.shape[-1])
        if self.stages:
            feats = []
            for s, names in enumerate(self.stages):
                x = run_stage(self, partial(self._run, names), x, s < self.recompute)
                feats.append(x)
        else:
            feats = self.body(x)
        out = []
        for i in self.taps:
            f = feats[i]
            f = f[0] if isinstance(f, (tuple, list)) else f  # as timm's FeatureDictNet returns a tuple tap
            out.append(f.permute(0, 3, 1, 2) if self.nhwc else f)
        self._check_sizes(size, out)
        return out

    def _check_sizes(self, size: tuple[int, int], feats: list[torch.Tensor]) -> None:
        """The priors assume ceil(size / stride) cells per map, as the native nets' "same" padding gives;
        a timm net that rounds down (a 4x4 stride-4 stem without padding) would misplace every prior."""
        if _tracing():
            return  # symbolic sizes; the eager model was checked at the same img_dim
        h, w = size
        for f, s in zip(feats, self.strides, strict=True):
            want = (-(-h // s), -(-w // s))
            if (f.shape[-2], f.shape[-1]) != want:
                raise RecipeError(
                    f"model.backbone: {self.spec} gives a {f.shape[-2]}x{f.shape[-1]} map at stride {s} for a "
                    f"{h}x{w} input where the priors expect {want[0]}x{want[1]}: use a model.img_dim that is a "
                    f"multiple of {max(self.strides)}"
                )


def _tracing() -> bool:
    """torch.jit/dynamo/torch.export tracing (``torch.compiler.is_exporting`` is torch >= 2.5's)."""
    compiler = getattr(torch, "compiler", None)
    return torch.jit.is_tracing() or any(
        getattr(compiler, f, lambda: False)() for f in ("is_compiling", "is_exporting")
    )


def _flattened(key: str) -> str:
    """A classifier key as timm's ``flatten_sequential`` feature nets name it ("stages.0.x" -> "stages_0.x")."""
    head, sep, rest = key.partition(".")
    return f"{head}_{rest}" if sep else key


def _first_convs(body: nn.Module) -> set[str]:
    names = (getattr(body, "pretrained_cfg", None) or {}).get("first_conv") or ()
    return {names} if isinstance(names, str) else set(names)


def load_backbone_weights(model: nn.Module, path: str) -> LoadReport:
    """Load ``path`` (a timm classifier's or feature net's state dict, .safetensors or .pth) into the model's
    timm backbone. Every backbone tensor must come from the file (but BatchNorm's step counters): a file of
    another architecture is an error naming the file, not a half-random backbone. The classifier's tensors
    are reported as unexpected; a stem of another channel count is adapted as timm does."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, TimmBackbone)]
    if not found:
        raise RecipeError("model.backbone_weights: the model has no timm backbone (model.backbone)")
    where, backbone = found[0]
    prefix = f"{where}.body." if where else "body."
    try:
        sd = read_state_dict(path)
    except WeightsError as exc:
        raise WeightsError(f"model.backbone_weights: {exc}") from None
    body = backbone.body
    target = body.state_dict()
    first_convs = _first_convs(body)
    report = LoadReport(path=str(path), prefix=prefix)
    usable: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        mk = key if key in target else _flattened(key)
        if mk not in target:
            report.unexpected.append(key)
            continue
        want = target[mk].shape
        if value.shape != want and value.dim() == 4 and mk.removesuffix(".weight") in first_convs and (
            value.shape[0] == want[0] and value.shape[2:] == want[2:]
        ):
            from timm.models import adapt_input_conv

            value = adapt_input_conv(want[1], value)
        if value.shape != want:
            report.skipped.append(f"{mk}: file {tuple(value.shape)} vs backbone {tuple(want)}")
            continue
        usable[mk] = value
        report.loaded.append(prefix + mk)
    report.missing = [k for k in target if k not in usable and not k.endswith("num_batches_tracked")]
    if not usable:
        like = f", e.g. {next(iter(sd))!r}" if sd else ""
        raise WeightsError(f"model.backbone_weights: {path}: no tensor matches {backbone.spec} ({len(sd)} in the "
                           f"file{like}; the backbone's are like {next(iter(target))!r})")
    if report.skipped or report.missing:
        problems = []
        if report.skipped:
            problems.append(f"{len(report.skipped)} of another shape, e.g. {report.skipped[0]}")
        if report.missing:
            problems.append(f"{len(report.missing)} missing, e.g. {report.missing[0]}")
        raise WeightsError(f"model.backbone_weights: {path}: does not fit {backbone.spec} ({'; '.join(problems)})")
    body.load_state_dict(usable, strict=False)
    return report
