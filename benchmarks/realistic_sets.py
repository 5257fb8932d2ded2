"""Generated VOC sets with the variety of real photos, for benchmarks/time_to_accuracy.py.

    python benchmarks/realistic_sets.py --set varied --out data/bench_varied [--num-train 240 --num-val 60]
    python benchmarks/realistic_sets.py --set small --out data/bench_small

Writes ``<out>/<set>_train<N>_val<M>_seed<S>_v<VERSION>/`` (JPEGImages/*.jpg, Annotations/*.xml,
ImageSets/Main/{train,val}.txt: what ``data.format = "voc"`` reads) and prints that folder. The version is in the
name, so a changed generator writes a new folder instead of reusing a stale one; a folder holding ``stamp.json``
is complete and is reused.

Two classes, ``star`` and ``cross``: both drawn with the same colour and texture distributions, random rotation,
aspect and size, so neither colour nor one pixel statistic gives the class away; the outline does.

* ``varied``: image sizes 320x240 ... 640x480, landscape, portrait and square; gradient + low-frequency textured
  backgrounds with unlabelled clutter (ellipses, rectangles, triangles, rings' arcs, lines); 1-8 objects from ~3 %
  to ~70 % of the short side; overlap between objects up to IoU 0.5 (later ones occlude earlier ones) and objects
  cut by the image border; uneven lighting, blur, sensor noise, JPEG quality 35-95.
* ``small``: crowded scenes of 5-20 objects of 2-10 % of the short side, milder clutter and degradation.

Each image comes from its own ``numpy`` Generator seeded by (seed, set, index): deterministic, independent of the
number of images.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 1  # bump when the drawing changes: the folder name changes with it
CLASSES = ("star", "cross")
STAMP = "stamp.json"
SIZES_VARIED = ((320, 240), (400, 300), (480, 360), (512, 384), (640, 480), (640, 360), (416, 416),
                (240, 320), (360, 480), (384, 512), (480, 640))
SIZES_SMALL = ((512, 384), (640, 480), (480, 480), (384, 512))


@dataclass(frozen=True)
class SetSpec:
    sizes: tuple[tuple[int, int], ...]
    num_objects: tuple[int, int]  # inclusive range
    rel_size: tuple[float, float]  # object side / image short side, sampled log-uniform
    clutter: tuple[int, int]  # distractor shapes
    lines: tuple[int, int]
    max_iou: float
    border_cut: float  # probability that an object may stick out of the image
    blur: float  # probability of a Gaussian blur
    noise: tuple[float, float]  # sensor noise sigma range
    jpeg: tuple[int, int]  # quality range
    lighting: float  # max relative gain change across the image


SETS: dict[str, SetSpec] = {
    "varied": SetSpec(SIZES_VARIED, (1, 8), (0.03, 0.70), (3, 14), (2, 10), 0.5, 0.3, 0.5, (2.0, 12.0),
                      (35, 95), 0.45),
    "small": SetSpec(SIZES_SMALL, (5, 20), (0.02, 0.10), (2, 8), (1, 5), 0.3, 0.15, 0.25, (1.0, 6.0),
                     (60, 95), 0.25),
}


def _seed(name: str, seed: int, index: int) -> list[int]:
    return [seed, sum(name.encode()) * 7919 + len(name), index]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of shape (h, w): a small random grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8), "L").resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A linear gradient between two colours, modulated by a low-frequency texture, as float (h, w, 3)."""
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = a * (1 - t[..., None]) + b * t[..., None]
    tex = _smooth_field(rng, w, h, int(rng.integers(3, 12))) - 0.5
    return img + tex[..., None] * rng.uniform(20, 90)


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A fill for one shape: flat, stripes, checks or mottled, in two colours from the common distribution."""
    c1, c2 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    kind = rng.integers(0, 4)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        period = rng.uniform(3, 14)
        ang = rng.uniform(0, math.pi)
        t = (np.sin((xs * math.cos(ang) + ys * math.sin(ang)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        period = rng.uniform(3, 12)
        t = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
    else:
        t = _smooth_field(rng, w, h, int(rng.integers(2, 6)))
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _rotate(points: np.ndarray, angle: float, sx: float, sy: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    p = points * np.array([sx, sy], np.float32)
    return np.stack([p[:, 0] * c - p[:, 1] * s + cx, p[:, 0] * s + p[:, 1] * c + cy], axis=1)


def _outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-radius polygon of a class or distractor shape, centred on 0."""
    if kind == "star":
        n = int(rng.integers(5, 7))
        inner = rng.uniform(0.38, 0.55)
        ang = np.arange(2 * n) * math.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    if kind == "cross":
        a = rng.uniform(0.28, 0.45)  # half the arm width
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                         (-1, a), (-1, -a), (-a, -a)], np.float32)
    if kind == "triangle":
        ang = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        return np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if kind == "rect":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float32)
    ang = np.linspace(0, 2 * math.pi, 32, endpoint=False)  # ellipse
    return np.stack([np.cos(ang), np.sin(ang)], axis=1)


def _paste_shape(canvas: Image.Image, poly: np.ndarray, rng: np.random.Generator, hole: float = 0.0) -> None:
    """Fill ``poly`` (image px) with a fresh texture; ``hole``: cut a concentric hole of that relative size."""
    w, h = canvas.size
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask)
    local = [(float(x - x0), float(y - y0)) for x, y in poly]
    draw.polygon(local, fill=255)
    if hole > 0:
        centre = poly.mean(0)
        draw.polygon([(float((x - centre[0]) * hole + centre[0] - x0), float((y - centre[1]) * hole + centre[1] - y0))
                      for x, y in poly], fill=0)
    canvas.paste(_texture(rng, x1 - x0, y1 - y0), (x0, y0), mask)


def _iou_and_cover(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """IoU of two xyxy boxes and the largest fraction of either box covered by their intersection."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    aa, ab = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (aa + ab - inter), inter / min(aa, ab)


def render(name: str, spec: SetSpec, seed: int, index: int) -> tuple[bytes, int, int, list[tuple[str, list[int]]]]:
    """(JPEG bytes, width, height, [(class, [xmin, ymin, xmax, ymax] 1-based inclusive VOC)]) of one image."""
    rng = np.random.default_rng(_seed(name, seed, index))
    w, h = spec.sizes[int(rng.integers(len(spec.sizes)))]
    short = min(w, h)
    canvas = Image.fromarray(np.clip(_background(rng, w, h), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(spec.clutter[0], spec.clutter[1] + 1))):
        kind = ("triangle", "rect", "ellipse", "ring")[int(rng.integers(4))]
        r = short * math.exp(rng.uniform(math.log(spec.rel_size[0]), math.log(spec.rel_size[1]))) / 2
        poly = _rotate(_outline("ellipse" if kind == "ring" else kind, rng), rng.uniform(0, 2 * math.pi), r,
                       r * rng.uniform(0.4, 1.0), rng.uniform(0, w), rng.uniform(0, h))
        _paste_shape(canvas, poly, rng, hole=rng.uniform(0.5, 0.8) if kind == "ring" else 0.0)
    for _ in range(int(rng.integers(spec.lines[0], spec.lines[1] + 1))):
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 4)))]
        draw.line(pts, fill=_colour(rng), width=int(rng.integers(1, max(2, short // 60) + 1)))

    objects: list[tuple[str, list[int]]] = []
    boxes: list[np.ndarray] = []
    for _ in range(int(rng.integers(spec.num_objects[0], spec.num_objects[1] + 1))):
        for _attempt in range(30):
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            r = short * math.exp(rng.uniform(math.log(spec.rel_size[0]), math.log(spec.rel_size[1]))) / 2
            aspect = math.exp(rng.uniform(-0.35, 0.35))
            # the centre stays r * m inside the border; m < 1 lets the shape stick out (the visibility check
            # below keeps at least half of its box in the image)
            m = rng.uniform(-0.2, 0.6) if rng.random() < spec.border_cut else 1.0
            cx, cy = (rng.uniform(r * m, side - r * m) if side > 2 * r * m else side / 2 for side in (w, h))
            poly = _rotate(_outline(cls, rng), rng.uniform(0, 2 * math.pi), r * aspect, r / aspect, cx, cy)
            full = np.concatenate([poly.min(0), poly.max(0)])
            box = np.clip(full, 0, [w, h, w, h])
            visible = (box[2] - box[0]) * (box[3] - box[1]) / max((full[2] - full[0]) * (full[3] - full[1]), 1e-6)
            if box[2] - box[0] < 4 or box[3] - box[1] < 4 or visible < 0.5:
                continue
            if any(iou > spec.max_iou or cover > 0.6 for iou, cover in (_iou_and_cover(box, b) for b in boxes)):
                continue
            _paste_shape(canvas, poly, rng)
            boxes.append(box)
            # continuous [x0, x1) -> the 1-based inclusive pixel indices VOC stores (voc.py reads xmin - 1, xmax)
            objects.append((cls, [int(math.floor(box[0])) + 1, int(math.floor(box[1])) + 1,
                                  int(math.ceil(box[2])), int(math.ceil(box[3]))]))
            break

    img = np.asarray(canvas, np.float32)
    gain = 1 + (_smooth_field(rng, w, h, 2) - 0.5) * 2 * spec.lighting
    img = img * gain[..., None] * rng.uniform(0.7, 1.2)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < spec.blur:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    noisy = np.asarray(out, np.float32) + rng.normal(0, rng.uniform(*spec.noise), (h, w, 3))
    out = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(spec.jpeg[0], spec.jpeg[1] + 1)))
    return buf.getvalue(), w, h, objects


def voc_xml(filename: str, w: int, h: int, objects: list[tuple[str, list[int]]]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = filename
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        truncated = int(x0 <= 1 or y0 <= 1 or x1 >= w or y1 >= h)
        ET.SubElement(obj, "truncated").text = str(truncated)
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def set_dir(out: str | Path, name: str, num_train: int, num_val: int, seed: int) -> Path:
    return Path(out) / f"{name}_train{num_train}_val{num_val}_seed{seed}_v{VERSION}"


def build(name: str, out: str | Path, num_train: int = 240, num_val: int = 60, seed: int = 0) -> Path:
    """The set's folder, generated unless a complete one is there. Built in a temp sibling, then renamed."""
    if name not in SETS:
        raise SystemExit(f"--set {name!r}: expected one of {', '.join(SETS)}")
    dest = set_dir(out, name, num_train, num_val, seed)
    if (dest / STAMP).is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(num_train + num_val)]
    for i, image_id in enumerate(ids):
        data, w, h, objects = render(name, SETS[name], seed, i)
        (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
        (tmp / "Annotations" / f"{image_id}.xml").write_bytes(voc_xml(f"{image_id}.jpg", w, h, objects))
    (tmp / "ImageSets/Main/train.txt").write_text("".join(f"{x}\n" for x in ids[:num_train]))
    (tmp / "ImageSets/Main/val.txt").write_text("".join(f"{x}\n" for x in ids[num_train:]))
    stamp = {"set": name, "version": VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
             "classes": list(CLASSES)}
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    try:
        tmp.rename(dest)
    except OSError:  # another process finished the same set first: theirs is identical
        if not (dest / STAMP).is_file():
            raise
        shutil.rmtree(tmp)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, choices=sorted(SETS))
    ap.add_argument("--out", required=True, help="parent folder; the set goes into a versioned sub-folder")
    ap.add_argument("--num-train", type=int, default=240)
    ap.add_argument("--num-val", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.set, args.out, args.num_train, args.num_val, args.seed))


if __name__ == "__main__":
    main()
