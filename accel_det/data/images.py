"""Reading images: pixels as uint8 CHW with EXIF orientation applied, and sizes from headers alone.

A source is a file (path), encoded bytes or a binary file object, or an ``EmbeddedImage``: an image stored
inside a dataset file (a row of a Hugging Face arrow table, data/hf.py), read only when the pixels are needed.
Every failure is a ``DatasetError`` naming the file (or the dataset and row), so a reader can tell a bad image
(one sample) from a bug.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from accel_det.errors import DatasetError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that rotate by 90 degrees: width <-> height
# What Pillow raises for a file that is not a readable image: unknown format, truncated or corrupt data
# (OSError, SyntaxError, ValueError from the decoders), or pixel counts past its decompression-bomb limit.
UNREADABLE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class EmbeddedImage(ABC):
    """An image that is not a file of its own. Picklable and cheap to hold (DataLoader workers and the data
    doctor's processes receive it); ``str()`` is what messages name, e.g. ``data/cppe5/train[row 12]``."""

    @abstractmethod
    def read(self) -> bytes | Path:
        """The encoded image, or the path of the file it refers to; ``DatasetError`` when there is neither."""


ImageSource = str | Path | bytes | BinaryIO | EmbeddedImage


def _resolve(source: ImageSource, name: str | None) -> tuple[str | Path | BinaryIO, str]:
    """(what ``Image.open`` takes, the name messages use) of ``source``; an ``EmbeddedImage`` is read here."""
    if isinstance(source, EmbeddedImage):
        ref, source = str(source), source.read()
        name = name or (ref if isinstance(source, bytes) else f"{ref} ({source})")
    if isinstance(source, bytes):
        return io.BytesIO(source), name or "<image bytes>"
    if isinstance(source, (str, Path)):
        return source, name or str(source)
    return source, name or str(getattr(source, "name", "<image file object>"))


def open_image(source: ImageSource) -> Image.Image:
    """``Image.open`` of any ``ImageSource`` (lazy: the header only). Failures are Pillow's (or the embedding's
    ``DatasetError``): callers word them."""
    return Image.open(_resolve(source, None)[0])


def load_image(source: ImageSource, channels: int = 3, name: str | None = None) -> tv_tensors.Image:
    """Read an image as uint8 CHW with EXIF orientation applied: RGB (channels=3) or L (channels=1).
    ``source``: a path, encoded bytes, a binary file object or an ``EmbeddedImage``; ``name``: what errors
    name (default: the path, the file object's name, or the embedded image's dataset and row)."""
    fp, path = _resolve(source, name)
    if channels not in (1, 3):
        raise DatasetError(f"{path}: cannot load images with {channels} channels (supported: 1, 3)")
    try:
        with Image.open(fp) as img:
            # Phone photos store pixels unrotated plus an Orientation tag; annotations (and people) see the
            # rotated picture, so rotate before anything reads the size.
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when it has nothing to do
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):
                img = _sixteen_to_eight_bit(img)
            elif img.mode == "F":
                img = _float_to_eight_bit(img, path)
            elif img.mode == "P":
                # Palette images with a transparent index warn when converted straight to RGB.
                img = img.convert("RGBA")
            mode = "L" if channels == 1 else "RGB"
            if img.mode != mode:  # gray/RGBA/CMYK/16-bit -> 8-bit L or RGB (convert copies even when it is one)
                img = img.convert(mode)
            pixels = np.array(img)  # decodes now, while the file is open; (H, W) or (H, W, C) uint8
    except DatasetError:
        raise  # already names the file; DataError is a ValueError, keep the clause below from rewording it
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file missing") from None
    except UNREADABLE_ERRORS as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from None
    # CHW as a view of the HWC array, as F.pil_to_tensor returns it, without its extra copy through tobytes
    tensor = torch.from_numpy(pixels)
    return tv_tensors.Image(tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1))


def _sixteen_to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit gray (PNG/TIFF from thermal or medical cameras; Pillow opens them as "I;16" or "I"):
    PIL's convert would clip everything above 255 to white, so scale the 16-bit range down instead."""
    pixels = np.asarray(img).astype(np.int64)
    if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels // 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def _float_to_eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """32-bit float gray (mode "F": TIFFs from scientific cameras or exported by numpy pipelines): PIL's
    convert truncates values to 0..255, so a [0, 1] image turns black. Scale [0, 1] data, clip the rest."""
    pixels = np.asarray(img, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise DatasetError(f"{path}: float image has NaN or infinite pixel values")
    if pixels.max(initial=0.0) <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def image_size(path: Path, oriented: bool = True) -> tuple[int, int]:
    """(width, height) of an image from its header alone (no pixels decoded); ``oriented``: as ``load_image``
    returns it, i.e. swapped for EXIF orientations 5-8 (for some formats, e.g. PNG, reading EXIF decodes the
    image)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if oriented and img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file missing") from None
    except UNREADABLE_ERRORS as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from None
    return int(w), int(h)
