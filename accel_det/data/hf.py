"""Hugging Face datasets on the local disk (``data.format = "hf"``): a ``save_to_disk`` folder (a Dataset, or a
split of a DatasetDict) or parquet/arrow files, in the object-detection layout of the Hugging Face guides
(cppe-5): an ``image`` column (an ``Image`` feature; raw bytes or file paths work too) and an ``objects`` column
holding ``bbox`` (COCO ``[x, y, width, height]`` in pixels) and ``category`` per object, as a dict of lists
(``Sequence({...})``) or a list of dicts. Optional: ``objects.iscrowd`` (crowd boxes become ``difficult``, left
out of training as in coco.py), ``image_id`` (used when the values are distinct integers; else the row index),
and ``width``/``height`` (a box wholly outside them is dropped). Where the split lives: hf_local.py.

Nothing is downloaded: a Hub name is an error that says how to ``save_to_disk`` first, and ``datasets`` runs
with its offline switches on. Parquet files are converted once into ``datasets``' arrow cache
(``HF_DATASETS_CACHE``) -- rows of a parquet file cannot be read one at a time -- and saved folders and arrow
files are used as they are.

Classes. With a ``ClassLabel`` (``objects.category``), categories are matched by *name* to ``class_names``
(empty: the ClassLabel's names, less ``ignore_classes``), and ``category_ids`` are the ClassLabel indices, for
predictions written in the dataset's numbering. Without one, string categories are names, and integer ones
index ``class_names`` (0-based, like YOLO). As in coco.py, a name in neither ``class_names`` nor
``ignore_classes`` stops the run, all listed in one error.

Images. Indexing reads the annotation columns only; a sample's pixels are read from the memory-mapped arrow
files when it is loaded, and decoded by ``load_image`` (EXIF orientation, gray/RGBA/16-bit handling), through
the records' ``EmbeddedImage``. No ``datasets`` or pyarrow object crosses a fork: each process maps the files
itself on first use (``ArrowRows``), and pickling (spawned workers, the data doctor) sends the file names only.

Bad entries (``on_bad_sample`` "skip"/"blank"; "error" raises the first): a row without an image (or whose
image file is missing) or with unreadable ``objects`` drops the image; a malformed or inverted box, a
category outside the ClassLabel, or a box wholly outside ``width``/``height`` drops the object.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accel_det.errors import RecipeError

try:
    import pyarrow as pa
    import pyarrow.compute as pc
except ImportError:  # pyarrow comes with datasets, the optional dependency of this format
    raise RecipeError("data.format: 'hf' needs the package datasets (pip install 'accel-det[hf]')") from None
from accel_det.hf_local import HFSplit, category_names, locate

from .common import (
    IMAGE_DROPPED,
    OBJECT_DROPPED,
    BadEntry,
    DatasetError,
    DirIndex,
    Record,
    check_box,
    check_inside,
    fatal,
)
from .dataset import DetectionDataset, OnBadSample, StagedTransforms, Transforms
from .images import EmbeddedImage

IMAGE_COLUMN = "image"
OBJECTS_COLUMN = "objects"


def _datasets() -> Any:
    """``datasets``, offline: the env switches count only before its first import, the config flags after."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise RecipeError("data.format: 'hf' needs the package datasets (pip install 'accel-det[hf]')") from None
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, flag):
            setattr(datasets.config, flag, True)
    return datasets


def _datasets_errors(ds_lib: Any) -> tuple[type[BaseException], ...]:
    """What ``datasets`` raises for unreadable data: its base error (``datasets.exceptions``, 2.15+), or the
    builder's generation error (where datasets 2.14 defined it)."""
    found = (getattr(getattr(ds_lib, "exceptions", None), "DatasetsError", None),
             getattr(getattr(ds_lib, "builder", None), "DatasetGenerationError", None))  # fmt: skip
    return tuple(e for e in found if isinstance(e, type) and issubclass(e, BaseException))


def open_split(split: HFSplit) -> tuple[list[str], dict[str, Any], int]:
    """(the arrow files holding the split's rows, in order; its features as JSON; its row count), opened
    through ``datasets`` (``load_from_disk``, ``Dataset.from_file``, ``Dataset.from_parquet``)."""
    ds_lib = _datasets()
    try:
        if split.kind == "disk":
            ds = ds_lib.load_from_disk(str(split.files[0]), keep_in_memory=False)
        elif split.kind == "arrow":
            parts = [ds_lib.Dataset.from_file(str(f)) for f in split.files]
            ds = parts[0] if len(parts) == 1 else ds_lib.concatenate_datasets(parts)
        else:
            ds = ds_lib.Dataset.from_parquet([str(f) for f in split.files])
    except (OSError, ValueError, pa.ArrowException, *_datasets_errors(ds_lib)) as exc:
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        raise DatasetError(f"{split.name}: cannot read the dataset: {why}") from None
    if isinstance(ds, ds_lib.DatasetDict):
        raise DatasetError(f"{split.name}: a DatasetDict (splits: {', '.join(ds)}): set data.root to it and "
                           "data.train / data.val to split names")  # fmt: skip
    files = [c["filename"] for c in ds.cache_files]
    if not files:
        raise DatasetError(f"{split.name}: datasets holds it in memory, not in arrow files accel_det can map")
    return files, ds.features.to_dict(), len(ds)


def _read_arrow(path: str) -> pa.Table:
    """An arrow file as ``datasets`` writes it (IPC stream), memory-mapped: no row is copied until read."""
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


class ArrowRows:
    """The image column of a split's arrow files, memory-mapped once per process.

    A process forked after the first use sees another pid and maps the files again rather than use the
    parent's reader; pickling keeps the file names only, so a spawned worker does the same."""

    def __init__(self, files: Sequence[str], name: str, column: str = IMAGE_COLUMN) -> None:
        self.files = tuple(files)
        self.name = name
        self.column = column
        self._pid: int | None = None
        self._values: pa.ChunkedArray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "name": self.name, "column": self.column}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"], state["name"], state["column"])  # type: ignore[misc]

    def table(self) -> pa.Table:
        """Every column of every file, end to end (zero-copy views of the mapped files)."""
        return pa.concat_tables([_read_arrow(f) for f in self.files])

    def value(self, row: int) -> Any:
        """The image cell of ``row`` as Python: {"bytes", "path"} (an Image feature), bytes or a path string."""
        if self._pid != os.getpid():
            self._values = self.table().column(self.column)
            self._pid = os.getpid()
        assert self._values is not None
        return self._values[row].as_py()


@dataclass(frozen=True)
class ArrowImage(EmbeddedImage):
    """Row ``row`` of an ``ArrowRows``: what a record of a Hugging Face dataset loads its pixels from."""

    rows: ArrowRows
    row: int

    def __str__(self) -> str:
        return f"{self.rows.name}[row {self.row}]"

    def read(self) -> bytes | Path:
        try:
            value = self.rows.value(self.row)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{self}: cannot read the row: {exc}") from None
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value:
            return Path(value)
        raise DatasetError(f"{self}: no image in this row")


def _fields(table: pa.Table, column: str) -> list[str]:
    """The fields of a struct column, or of the structs of a list column."""
    t = table.schema.field(column).type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return [t.field(i).name for i in range(t.num_fields)] if pa.types.is_struct(t) else []


def _image_cells(table: pa.Table, name: str) -> tuple[np.ndarray, list[str | None]]:
    """(rows whose image cell holds bytes, the path of each row that has a path but no bytes else None)."""
    col = table.column(IMAGE_COLUMN)
    t, n = col.type, table.num_rows
    paths: pa.ChunkedArray | None = None
    if pa.types.is_struct(t) and {"bytes", "path"} <= {t.field(i).name for i in range(t.num_fields)}:
        paths = pc.struct_field(col, "path")
        has = pc.and_(col.is_valid(), pc.struct_field(col, "bytes").is_valid()).to_numpy(zero_copy_only=False)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        has = col.is_valid().to_numpy(zero_copy_only=False)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        paths, has = col, np.zeros(n, dtype=bool)
    else:
        raise DatasetError(f"{name}: column {IMAGE_COLUMN!r} is {t}: expected an Image feature, bytes or file paths")
    if paths is None or has.all():
        return has, [None] * n
    # only the rows without bytes: a path column is small, but keep the bytes column untouched
    missing = np.flatnonzero(~has)
    found: list[str | None] = [None] * n
    for i, p in zip(missing.tolist(), paths.take(pa.array(missing)).to_pylist()):
        found[i] = p or None
    return has, found


def _object_list(value: Any, where: str, file: str) -> list[tuple[Any, Any, Any]]:
    """(bbox, category, iscrowd) of each object of one row's ``objects`` (a dict of lists or a list of dicts)."""
    if value is None:
        return []
    if isinstance(value, dict):
        bbox, cat = value.get("bbox"), value.get("category")
        crowd = value.get("iscrowd")
        if not isinstance(bbox, list) or not isinstance(cat, list) or len(bbox) != len(cat):
            raise BadEntry("malformed_annotation", file,
                           f"{where}: objects.bbox and objects.category must be lists of one length")  # fmt: skip
        if crowd is None:
            crowd = [0] * len(bbox)
        if not isinstance(crowd, list) or len(crowd) != len(bbox):
            raise BadEntry("malformed_annotation", file, f"{where}: objects.iscrowd does not match objects.bbox")
        return list(zip(bbox, cat, crowd))
    if isinstance(value, list) and all(isinstance(o, dict) for o in value):
        return [(o.get("bbox"), o.get("category"), o.get("iscrowd") or 0) for o in value]
    raise BadEntry("malformed_annotation", file, f"{where}: objects is neither a dict of lists nor a list of dicts")


class HFDetection(DetectionDataset):
    """One split of a local Hugging Face dataset: ``where`` under ``root`` (hf_local.locate). ``class_names``
    empty: the ClassLabel's names, less ``ignore_classes``. ``keep_crowd``, ``on_bad_sample``,
    ``ignore_classes``, ``seed``: as in ``COCODetection``."""

    def __init__(
        self,
        root: str | Path,
        where: str,
        class_names: Sequence[str],
        transforms: Transforms | StagedTransforms | None = None,
        channels: int = 3,
        keep_crowd: bool = True,
        *,
        on_bad_sample: OnBadSample = "error",
        ignore_classes: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        super().__init__(
            class_names, transforms, channels, keep_difficult=keep_crowd,
            on_bad_sample=on_bad_sample, ignore_classes=ignore_classes, seed=seed,
        )  # fmt: skip
        split = locate(root, where)
        self.hf_split = split
        files, features, num_rows = open_split(split)
        self.rows = ArrowRows(files, split.name)
        table = self.rows.table()
        if table.num_rows != num_rows:
            raise DatasetError(f"{split.name}: its arrow files hold {table.num_rows} rows, the dataset {num_rows} "
                               "(an indices mapping?): save it again with save_to_disk")  # fmt: skip
        missing = [c for c in (IMAGE_COLUMN, OBJECTS_COLUMN) if c not in table.column_names]
        fields = _fields(table, OBJECTS_COLUMN) if not missing else []
        if missing or not {"bbox", "category"} <= set(fields):
            what = f"no column {', '.join(map(repr, missing))}" if missing else f"objects has {fields}"
            raise DatasetError(f"{split.name}: expected an 'image' column and an 'objects' column with 'bbox' and "
                               f"'category' (the Hugging Face object-detection layout); {what} (columns: "
                               f"{', '.join(table.column_names)})")  # fmt: skip
        label_names = category_names(features)
        self._match_classes(label_names, split.name)
        self._index(table, split.name)
        self.finish_index(split.name, "unknown class names", "add them to data.class_names or data.ignore_classes")

    def _match_classes(self, label_names: list[str] | None, name: str) -> None:
        """``class_names`` (from the ClassLabel when empty), ``category_ids`` and the ClassLabel's index ->
        (label or 0, class name) map."""
        self._label_names = label_names
        if label_names is None:
            if not self.class_names:
                raise DatasetError(f"{name}: objects.category is no ClassLabel feature: list the class names in "
                                   "data.class_names")  # fmt: skip
            self.category_ids = list(range(len(self.class_names)))  # integer categories index class_names
            return
        if not self.class_names:
            self.class_names = [n for n in label_names if n not in self.ignore_classes]
        absent = [n for n in self.class_names if n not in label_names]
        if absent:
            raise fatal("unknown_class", name, f"{name}: the ClassLabel of objects.category ({', '.join(label_names)})"
                        f" has no class {', '.join(map(repr, absent))}")  # fmt: skip
        self.category_ids = [label_names.index(n) for n in self.class_names]
        for n in label_names:
            if n not in self.class_names and n not in self.ignore_classes:
                self.unknown.add(n, "", count=0)  # listed even when no object uses it, as coco.py does

    def _category(self, value: Any, where: str, file: str) -> str | int:
        """The class name of a category value, or (integer categories without a ClassLabel) its index."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise BadEntry("malformed_annotation", file, f"{where}: category {value!r} is neither a name nor an index")
        if isinstance(value, str) or self._label_names is None:
            return value
        if not 0 <= value < len(self._label_names):
            raise BadEntry("malformed_annotation", file,
                           f"{where}: category {value} is outside the ClassLabel (0..{len(self._label_names) - 1})")
        return self._label_names[value]

    def _index(self, table: pa.Table, name: str) -> None:
        has_bytes, paths = _image_cells(table, name)
        objects = table.column(OBJECTS_COLUMN).to_pylist()
        ids = self._image_ids(table, name)
        sizes = [table.column(c).to_pylist() if c in table.column_names else None for c in ("width", "height")]
        labels_of = {n: i + 1 for i, n in enumerate(self.class_names)}
        files = DirIndex()
        for row in range(table.num_rows):
            image = ArrowImage(self.rows, row)
            where = file = str(image)  # a row is what an image file is to the other readers
            try:
                if not has_bytes[row]:
                    if paths[row] is None:
                        raise BadEntry("missing_image", file, f"{where}: no image in this row")
                    if not files.exists(Path(paths[row])):
                        raise BadEntry("missing_image", paths[row], f"{paths[row]}: image file missing ({where})")
                objs = _object_list(objects[row], where, file)
            except BadEntry as exc:
                self.drop(exc, IMAGE_DROPPED)
                continue
            w, h = (s[row] if s is not None else None for s in sizes)
            declared = (float(w), float(h)) if all(isinstance(v, (int, float)) and v > 0 for v in (w, h)) else None
            boxes, labels, crowd = [], [], []
            for k, (bbox, category, iscrowd) in enumerate(objs):
                at = f"{where}: object {k}"
                try:
                    cls = self._category(category, at, file)
                    xyxy = _box(bbox, at, file, declared)
                except BadEntry as exc:
                    self.drop(exc, OBJECT_DROPPED)
                    continue
                if isinstance(cls, int):  # integer category without a ClassLabel: an index into class_names
                    if not 0 <= cls < len(self.class_names):
                        self.unknown.add(str(cls), where)
                        continue
                    cls = self.class_names[cls]
                if cls in self.ignore_classes:
                    self.note("ignored_class", file, f"{at}: class {cls!r}", OBJECT_DROPPED)
                    continue
                if cls not in labels_of:
                    self.unknown.add(cls, where)
                    continue
                boxes.append(xyxy)
                labels.append(labels_of[cls])
                crowd.append(bool(iscrowd))
            self.records.append(Record(
                path=Path(where), image_id=ids[row],
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64).reshape(-1),
                difficult=np.asarray(crowd, dtype=bool).reshape(-1),
                image=image,
            ))  # fmt: skip

    def _image_ids(self, table: pa.Table, name: str) -> list[int]:
        """The ``image_id`` column when its values are distinct integers >= 0 (the evaluator keys images by
        id), else the row index."""
        rows = list(range(table.num_rows))
        if "image_id" not in table.column_names:
            return rows
        ids = table.column("image_id").to_pylist()
        if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) and len(set(ids)) == len(ids):
            return ids
        self.warnings.append(f"{name}: image_id is not a distinct non-negative integer per row: images are "
                             "numbered by row instead")  # fmt: skip
        return rows


def _box(bbox: Any, where: str, file: str, declared: tuple[float, float] | None) -> list[float]:
    """COCO ``[x, y, width, height]`` pixels -> xyxy, checked (and against the declared size, when given)."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):  # fmt: skip
        raise BadEntry("malformed_annotation", file, f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    xyxy = [x, y, x + w, y + h]
    check_box(xyxy, where, file)
    if declared is not None:
        check_inside(xyxy, *declared, where, file)
    return xyxy
