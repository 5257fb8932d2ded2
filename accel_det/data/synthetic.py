"""A synthetic VOC dataset of coloured circles, squares and triangles on noisy backgrounds.

It lets the demo recipe and the tests train and evaluate a detector with nothing downloaded. Each image
is drawn from its own ``numpy`` Generator seeded by ``(seed, index)``, so a given seed always gives the
same bytes (PNG, lossless) and the images do not depend on how many there are.

Each config gets its own folder under ``data.root``, ``synthetic_dir(root, cfg)`` (e.g.
``train320_val64_128px_max4_seed0_v1``): a run never replaces a set another run may be reading, so runs with
different synthetic configs can share a ``data.root``. The folder is built in a temporary sibling and
renamed into place, with ``synthetic.json`` (the config) written last: a folder that has the stamp is
complete. Several processes (one per GPU) may build the same config at the same time; the first rename wins
and the others throw their copy away. Nothing here deletes or renames a folder it did not create.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from accel_det.config import SyntheticConfig

from .common import DatasetError

SHAPES = ("circle", "square", "triangle")
STAMP = "synthetic.json"
GENERATOR_VERSION = 1  # bump when the drawing changes, so stale folders are rebuilt
MAX_OVERLAP = 0.1  # a new shape may cover at most this fraction of an earlier one (and vice versa)


def stamp_for(cfg: SyntheticConfig) -> dict[str, Any]:
    return {"generator": "accel_det.data.synthetic", "version": GENERATOR_VERSION, "config": cfg.model_dump()}


def synthetic_dir(root: str | Path, cfg: SyntheticConfig) -> Path:
    """The folder under ``root`` that holds the synthetic set of ``cfg``: a readable slug of every config
    field and of the generator version, so two configs never share a folder."""
    fields = cfg.model_dump()
    parts = [
        f"train{fields.pop('num_train')}",
        f"val{fields.pop('num_val')}",
        f"{fields.pop('img_size')}px",
        f"max{fields.pop('max_objects')}",
        f"seed{fields.pop('seed')}",
    ]
    # fields added to SyntheticConfig later still make the name unique, if less pretty
    parts += [f"{key}{value}" for key, value in sorted(fields.items())]
    parts.append(f"v{GENERATOR_VERSION}")
    return Path(root) / "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", part) for part in parts)


def is_complete(path: str | Path, cfg: SyntheticConfig) -> bool:
    """True when ``path`` (a ``synthetic_dir``) holds a finished synthetic set built from exactly this config."""
    try:
        return json.loads((Path(path) / STAMP).read_text(encoding="utf-8")) == stamp_for(cfg)
    except (OSError, ValueError):
        return False


def _check_classes(class_names: list[str]) -> None:
    if sorted(class_names) != sorted(SHAPES):
        raise DatasetError(
            f"synthetic data draws exactly the classes {', '.join(SHAPES)} (any order); "
            f"data.class_names = {list(class_names)}"
        )


def _outline(kind: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (k, 2) around (0, 0) of a shape whose side (or diameter) is ``size``."""
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1) * size / 2
    if kind == "square":
        angle = rng.uniform(
            -math.pi / 8, math.pi / 8
        )  # tilted a little: a 45 degree square reads as a diamond
        t = angle + np.arange(4) * math.pi / 2 + math.pi / 4
        return np.stack([np.cos(t), np.sin(t)], 1) * size / math.sqrt(2)
    t = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3  # equilateral, any rotation
    return np.stack([np.cos(t), np.sin(t)], 1) * size / math.sqrt(3)


def _contrasting_colour(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - base) > 120:
            return colour
    return 255.0 - base


def render(
    index: int, cfg: SyntheticConfig
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """Image ``index`` as HxWx3 uint8 and its objects: (class, 0-based inclusive pixel box x0, y0, x1, y1)."""
    rng = np.random.default_rng([cfg.seed % 2**64, index])  # SeedSequence wants non-negative
    s = cfg.img_size
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    base = rng.uniform(30, 225, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)
    canvas = base + ramp[..., None] * rng.uniform(-60, 60, 3)
    masks: list[np.ndarray] = []
    objects: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        for _attempt in range(20):
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            pts = _outline(kind, rng.uniform(0.12, 0.5) * s, rng)
            lo, hi = pts.min(0), pts.max(0)
            centre = rng.uniform(-lo, (s - 1) - hi)  # the whole shape inside the image
            layer = Image.new("L", (s, s), 0)
            ImageDraw.Draw(layer).polygon([tuple(p) for p in (pts + centre).tolist()], fill=255)
            mask = np.asarray(layer) > 0
            area = int(mask.sum())
            if area == 0 or any((mask & m).sum() > MAX_OVERLAP * min(area, m.sum()) for m in masks):
                continue
            canvas[mask] = _contrasting_colour(base, rng)
            masks.append(mask)
            ys, xs = np.nonzero(mask)
            objects.append((kind, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
            break
    canvas += rng.normal(0, rng.uniform(3, 15), canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def voc_xml(
    image_id: str, filename: str, size: int, objects: list[tuple[str, tuple[int, int, int, int]]]
) -> bytes:
    """A VOC annotation. Pixel boxes are 0-based inclusive; VOC wants 1-based inclusive, hence +1
    (``voc.py`` reads xmin-1, ymin-1, xmax, ymax: the continuous box covering exactly those pixels)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = filename
    sz = ET.SubElement(ann, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for name, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def _write(tmp: Path, cfg: SyntheticConfig) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(cfg.num_train + cfg.num_val)]
    for i, image_id in enumerate(ids):
        pixels, objects = render(i, cfg)
        Image.fromarray(pixels, "RGB").save(
            tmp / "JPEGImages" / f"{image_id}.png", format="PNG", compress_level=1
        )
        (tmp / "Annotations" / f"{image_id}.xml").write_bytes(
            voc_xml(image_id, f"{image_id}.png", cfg.img_size, objects)
        )
    (tmp / "ImageSets/Main/train.txt").write_text("".join(f"{x}\n" for x in ids[: cfg.num_train]))
    (tmp / "ImageSets/Main/val.txt").write_text("".join(f"{x}\n" for x in ids[cfg.num_train :]))
    (tmp / STAMP).write_text(json.dumps(stamp_for(cfg), indent=2, sort_keys=True) + "\n")  # last: "complete"


def _publish(tmp: Path, dest: Path, cfg: SyntheticConfig) -> None:
    """Rename ``tmp`` to ``dest``; keep a complete set another process published first (and drop ``tmp``);
    never touch a ``dest`` that holds anything else."""
    try:
        os.rename(tmp, dest)  # atomic; succeeds when dest is missing or an empty folder
        return
    except OSError as exc:
        failure = exc
    shutil.rmtree(tmp, ignore_errors=True)
    if is_complete(dest, cfg):  # another process won the race
        return
    if not dest.is_dir():
        raise DatasetError(f"data.root: cannot create {dest}: {_reason(failure)}")
    what = "a synthetic dataset of another config" if (dest / STAMP).exists() else "not a synthetic dataset"
    raise DatasetError(
        f"{dest}: exists and is {what} (no matching {STAMP}); remove it or choose another data.root"
    )


def _reason(exc: OSError) -> str:
    """``[Errno 2] No such file or directory``: the OS error without the path, which the caller names."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)


def make_synthetic_voc(root: str | Path, cfg: SyntheticConfig, class_names: list[str]) -> Path:
    """Build the synthetic set of ``cfg`` unless it is already complete, and return its folder
    ``synthetic_dir(root, cfg)`` (JPEGImages/*.png, Annotations/*.xml, ImageSets/Main/{train,val}.txt,
    synthetic.json). ``root`` is ``data.root``; errors name that key."""
    _check_classes(class_names)
    dest = synthetic_dir(root, cfg)
    if is_complete(dest, cfg):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"data.root: cannot create {dest.parent}: {_reason(exc)}") from None
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write(tmp, cfg)
    except BaseException as exc:  # Ctrl-C included: never leave a half-written .tmp folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DatasetError(f"data.root: cannot write {dest}: {_reason(exc)}") from None
        raise
    _publish(tmp, dest, cfg)
    return dest
