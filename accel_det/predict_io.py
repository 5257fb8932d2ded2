"""``predict``'s files: which images to read, reading them in DataLoader workers (decode + resize, in input
order), and writing the drawn PNGs off the forward pass.

Every input is one :class:`Loaded` from :class:`ImageFiles`, readable or not: a file that cannot be read
becomes an entry with its one-line error instead of an exception, so the worker, the batch and the other files
go on. :func:`collate` stacks the readable ones of a batch (all resized to the model's square, whatever their
own sizes) and keeps each one's original size, to map the boxes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from accel_det.errors import DataError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def collect_images(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(image file, its path relative to what was given) for every input image, in a stable order."""
    from accel_det.data.common import IMAGE_SUFFIXES, is_hidden

    out_abs = out.resolve()
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if (is_hidden(f, p) or f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file()
                        or _inside(f.resolve(), out_abs)):
                    continue
                found.append((f, f.relative_to(p)))
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise DataError(f"{p}: no such image or folder")
    seen: set[Path] = set()
    unique = []
    for f, rel in found:  # the same file given twice (directly and in a folder) is predicted once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, rel))
    if not unique:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return unique


def drawn_names(items: list[tuple[Path, Path]]) -> list[Path]:
    """Output PNG paths (relative to --out): the input's relative path as .png; where two inputs collide
    (a/x.jpg and a/x.png, or two folders of one name), each gets a hash of its full path in the name."""
    plain = [rel.with_suffix(".png") for _, rel in items]
    count = Counter(plain)
    return [
        name if count[name] == 1
        else name.with_name(f"{name.stem}.{hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:8]}.png")
        for (f, _), name in zip(items, plain)
    ]


def default_workers(cuda: bool) -> int:
    """Reader processes when ``--workers`` is not given. On a GPU the cores are free for reading: all but the
    one feeding the GPU, at most 8. On the CPU the forward pass already runs on every core (torch's intra-op
    threads) and decoding is a small part of an image's cost, while a reader process costs a fork, a join and
    its batches' copies: one per 4 cores (none on a 2-core machine, where it measured slower than reading in
    the main process: BENCHMARKS.md, Predict)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus - 1)) if cuda else min(8, cpus // 4)


@dataclass
class Loaded:
    """One input file as read by a worker: its model input, or the error that kept it from being read."""

    index: int  # position in the input list: results are written in input order
    image: torch.Tensor | None  # uint8 (C, img_dim, img_dim), what the model sees
    size: tuple[int, int]  # the original (h, w), to map the boxes back
    pixels: torch.Tensor | None  # the original image, when it is to be drawn
    error: str | None = None


class ImageFiles(Dataset):
    """The input files through the project's ``load_image`` (EXIF orientation, gray/RGBA/16-bit handling) and
    the run's val transforms (``resize``: to the square, stretched or letterboxed)."""

    def __init__(self, files: Sequence[Path], channels: int, resize: Callable[[Any], Any], keep_pixels: bool) -> None:
        self.files = list(files)
        self.channels = channels
        self.resize = resize
        self.keep_pixels = keep_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Loaded:
        from accel_det.data import load_image

        try:
            img = load_image(self.files[index], self.channels)
        except DataError as exc:
            return Loaded(index, None, (0, 0), None, str(exc))
        h, w = img.shape[-2:]
        # plain tensors: a tv_tensors subclass costs a __torch_function__ detour in every op downstream
        x = self.resize(img).as_subclass(torch.Tensor)
        return Loaded(index, x, (int(h), int(w)), img.as_subclass(torch.Tensor) if self.keep_pixels else None)


@dataclass
class Batch:
    images: torch.Tensor | None  # (n, C, img_dim, img_dim) uint8 of the readable files; None if there are none
    loaded: list[Loaded]  # the readable files, in the rows' order
    unreadable: list[Loaded]

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this for a custom batch type; only the model input goes to the device
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(samples: list[Loaded]) -> Batch:
    loaded = [s for s in samples if s.error is None]
    images = torch.stack([s.image for s in loaded if s.image is not None]) if loaded else None
    for s in loaded:
        s.image = None  # now a row of `images`; no second reference crosses the worker queue
    return Batch(images, loaded, [s for s in samples if s.error is not None])


def image_loader(files: Sequence[Path], channels: int, resize: Callable[[Any], Any], batch_size: int,
                 workers: int, keep_pixels: bool) -> DataLoader:
    """Batches of the files in input order; ``workers`` processes decode and resize ahead of the forward pass
    (0: in this process). Unlike training's workers (data/builder.py ``worker_init``) these keep the default
    signal handling: a SIGTERM should end them with the command, and torch's worker loop already takes Ctrl-C
    quietly, leaving the main process to raise it."""
    workers = min(workers, -(-len(files) // batch_size))  # no process without a batch to read
    return DataLoader(
        ImageFiles(files, channels, resize, keep_pixels), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=torch.cuda.is_available(),
    )


# One detection as json.dumps(indent=2) lays it out two levels down (entry list -> entry -> "detections"). The
# detections are most of predictions.json, and json's indented encoder is pure Python (the C one only does
# compact output before Python 3.13): at tens of detections per image it cost as much as reading the images.
_DETECTION = (
    '    {{\n      "box": [\n        {},\n        {},\n        {},\n        {}\n      ],\n      "score": {},\n'
    '      "label": {},\n      "class_name": {}\n    }}'
)


_DETECTION_FINITE = _DETECTION.replace("{}", "{!r}", 5)  # json writes floats with float.__repr__


def _number(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else "null"  # strict_json's null for NaN and inf


def _detection_json(d: dict[str, Any]) -> str:
    x0, y0, x1, y1 = d["box"]
    score, label, name = d["score"], int(d["label"]), json.encoder.encode_basestring_ascii(d["class_name"])
    if math.isfinite(x0 + y0 + x1 + y1 + score):  # the sum is NaN or inf if any of them is
        return _DETECTION_FINITE.format(x0, y0, x1, y1, score, label, name)
    return _DETECTION.format(*map(_number, d["box"]), _number(score), label, name)


def _entry_json(entry: dict[str, Any]) -> str:
    from accel_det.jsonio import strict_json

    dets = entry.get("detections")
    head = json.dumps(strict_json({k: v for k, v in entry.items() if k != "detections"}), indent=2, default=str)
    if dets is None:
        return head
    assert next(reversed(entry)) == "detections"  # spliced in last, where the dict has it
    body = "[\n" + ",\n".join(map(_detection_json, dets)) + "\n  ]" if dets else "[]"
    return f'{head[:-2]},\n  "detections": {body}\n}}'


def predictions_json(entries: list[dict[str, Any]]) -> str:
    """``write_json_atomic``'s text of predict's entries (``json.dumps(strict_json(entries), indent=2)`` and a
    newline), byte for byte, in a fraction of the time."""
    if not entries:
        return "[]\n"
    return "[\n" + ",\n".join("  " + _entry_json(e).replace("\n", "\n  ") for e in entries) + "\n]\n"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_png(array: Any, path: Path) -> None:
    """Written whole: a temp file renamed into place, so a killed run leaves no half-written PNG."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, or a folder where the PNG goes: one line naming the file
        with contextlib.suppress(OSError):  # none was written, or its folder is the problem
            tmp.unlink()
        raise DataError(f"{path}: cannot write the drawn image: {exc.strerror or exc}") from None


def draw_png(pixels: torch.Tensor, boxes: torch.Tensor, text: list[str], path: Path) -> None:
    """The image in its own pixels with the boxes and their ``class score`` labels, as a PNG."""
    from torchvision.utils import draw_bounding_boxes

    rgb = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    drawn = draw_bounding_boxes(rgb, boxes, labels=text, width=2) if len(boxes) else rgb
    save_png(drawn.permute(1, 2, 0).numpy(), path)


class Drawer:
    """Draws the PNGs on a pool of threads: most of a PNG's cost is zlib, which releases the GIL, so the drawing
    runs beside the next batches' forward pass instead of between them. At most ``4 * threads`` images wait
    (each holds its original pixels); the first failure is raised."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="draw")
        self.limit = 4 * threads
        self.pending: deque[Future[None]] = deque()

    def __call__(self, pixels: torch.Tensor, boxes: torch.Tensor, text: list[str], path: Path) -> None:
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(draw_png, pixels, boxes, text, path))

    def __enter__(self) -> Drawer:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            while self.pending and exc_type is None:
                self.pending.popleft().result()
        finally:
            # failing anyway: what has not started is dropped, the running ones end
            self.pool.shutdown(wait=True, cancel_futures=True)
