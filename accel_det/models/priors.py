"""Prior (anchor) boxes of the native anchor models, from ``[model.anchors]``.

Priors are kept in the SSD convention: normalised ``(cx, cy, w, h)`` in [0, 1] of the input image, one
row per anchor, ordered feature map -> row i -> column j -> anchor of that cell. That order is the one
the heads produce after ``permute(0, 2, 3, 1).reshape(N, -1, 4)``, so prior p and prediction p agree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from accel_det.config import AnchorConfig


def densify_factor(min_size: float, step: int, densify: bool) -> int:
    """Anchors per side tiled in one cell (FaceBoxes §3.3, "anchor densification strategy").

    The paper's tiling density is ``A_scale / A_interval``; anchors smaller than 4x their stride are
    too sparse to cover small faces, so a 32 px anchor on a stride-32 map is tiled 4x4 times and a
    64 px anchor 2x2 times, which brings every anchor scale to density 4.
    """
    if not densify or min_size >= 4 * step:
        return 1
    return max(1, round(4 * step / min_size))


class PriorBox(nn.Module):
    """Builds the priors for an input size once and caches them per (H, W, device, dtype).

    A plain dict cache (not a buffer) keeps priors out of the state dict, so a checkpoint does not
    depend on the image size, and means no CPU -> GPU copy per step once the first step filled it.
    """

    def __init__(self, cfg: AnchorConfig) -> None:
        super().__init__()
        self.min_sizes = [[float(s) for s in sizes] for sizes in cfg.min_sizes]
        self.steps = [int(s) for s in cfg.steps]
        self.aspect_ratios = [[float(r) for r in rs] for rs in cfg.aspect_ratios] or [[] for _ in self.steps]
        self.densify = cfg.densify
        self.clip = cfg.clip
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def num_anchors(self) -> list[int]:
        """Anchors per cell of each feature map: what each head's conv must predict."""
        out = []
        for sizes, step, ratios in zip(self.min_sizes, self.steps, self.aspect_ratios, strict=True):
            shapes = 1 + 2 * len(ratios)  # each ratio r adds r and 1/r
            out.append(sum(densify_factor(s, step, self.densify) ** 2 * shapes for s in sizes))
        return out

    @staticmethod
    def feature_size(image_size: int, step: int) -> int:
        # Every stride-2 conv/pool with "same" padding (k//2) rounds up, so a map is ceil(size / step):
        # the same rule as FaceBoxes.PyTorch's PriorBox.
        return math.ceil(image_size / step)

    def cell_template(self, k: int) -> torch.Tensor:
        """(A, 4) anchors of one cell as (cx offset, cy offset) in cells and (w, h) in pixels."""
        rows = []
        step = self.steps[k]
        for size in self.min_sizes[k]:
            n = densify_factor(size, step, self.densify)
            # FaceBoxes.PyTorch tiles dense anchors at j + {0, 1/n, ..., (n-1)/n} (not centred on the
            # sub-cells) and single anchors at j + 0.5. We keep its offsets so weights trained there
            # see the same priors; the loop order (cy outer, cx inner) is also the reference's.
            offs = [i / n for i in range(n)] if n > 1 else [0.5]
            shapes = [(size, size)]
            for r in self.aspect_ratios[k]:
                shapes += [
                    (size * math.sqrt(r), size / math.sqrt(r)),
                    (size / math.sqrt(r), size * math.sqrt(r)),
                ]
            for oy in offs:
                for ox in offs:
                    rows += [(ox, oy, w, h) for w, h in shapes]
        return torch.tensor(rows, dtype=torch.float64)

    def _build(self, height: int, width: int) -> torch.Tensor:
        out = []
        for k, step in enumerate(self.steps):
            fh, fw = self.feature_size(height, step), self.feature_size(width, step)
            tpl = self.cell_template(k)  # (A, 4)
            ii, jj = torch.meshgrid(
                torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64), indexing="ij"
            )
            cx = (jj.reshape(-1, 1) + tpl[:, 0]) * step / width  # (fh*fw, A)
            cy = (ii.reshape(-1, 1) + tpl[:, 1]) * step / height
            w = (tpl[:, 2] / width).expand_as(cx)
            h = (tpl[:, 3] / height).expand_as(cy)
            out.append(torch.stack([cx, cy, w, h], dim=-1).reshape(-1, 4))
        priors = torch.cat(out)
        if self.clip:
            # Clip in corner form: clamping (cx, cy, w, h) directly (as some references do) moves
            # centres and keeps boxes that still stick out of the image.
            x1y1 = (priors[:, :2] - priors[:, 2:] / 2).clamp(0, 1)
            x2y2 = (priors[:, :2] + priors[:, 2:] / 2).clamp(0, 1)
            priors = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], dim=1)
        return priors

    def forward(
        self, height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Priors (P, 4) normalised cx, cy, w, h for an input of ``height`` x ``width`` pixels."""
        key = (int(height), int(width), torch.device(device), dtype)
        priors = self._cache.get(key)
        if priors is None:
            # A first call under torch.inference_mode (eval, a benchmark) must not cache an inference
            # tensor: training would later fail to save it for backward.
            with torch.inference_mode(False):
                priors = self._build(key[0], key[1]).to(device=key[2], dtype=dtype)
            self._cache[key] = priors
        return priors
