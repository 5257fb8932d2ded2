"""Where a split of a local Hugging Face dataset lives, and the class names its features declare.

Torch-free and ``datasets``-free: recipe validation reads the class names from here (``data.class_names = []``
with ``data.format = "hf"``, config_data.py), and data/hf.py locates the split with the same rules before it
reads the rows. Nothing here, nor in data/hf.py, ever reaches the network: a name that is not a local path is
an error that says how to save the dataset first.

A split is ``data.root / data.train`` (or ``data.val``):

- a folder written by ``Dataset.save_to_disk`` (it has ``state.json``); a ``DatasetDict.save_to_disk`` folder
  keeps each split in such a sub-folder, so ``root`` = the DatasetDict folder and ``train`` = a split name;
- a ``.parquet`` or ``.arrow`` file, a glob pattern of them (``data/train-*.parquet``), or a folder of them.

The features are what ``datasets`` wrote beside the data: ``dataset_info.json`` of a saved folder, or the
``huggingface`` entry of a parquet/arrow schema's metadata (files written by other tools have none).
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from accel_det.errors import DatasetError

SUFFIXES = (".parquet", ".arrow")
# "user/name" (or a bare legacy name like "cppe-5"): what load_dataset would fetch from the Hub
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# the feature types that wrap a list: datasets < 4 wrote "Sequence", 4+ "List"/"LargeList"
_LIST_TYPES = ("Sequence", "List", "LargeList")


@dataclass(frozen=True)
class HFSplit:
    """``kind`` "disk": ``files`` is the one ``save_to_disk`` folder; "parquet"/"arrow": the files, sorted.
    ``name``: what messages call the split (the folder, the file or the pattern)."""

    kind: Literal["disk", "parquet", "arrow"]
    name: str
    files: tuple[Path, ...]


def hub_hint(name: str) -> str:
    """How to get a Hub dataset onto the disk, for the error that refuses to download it."""
    local = name.rsplit("/", 1)[-1]
    return (f"accel_det never downloads datasets: if {name!r} is a Hugging Face Hub dataset, save it first "
            f"(python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('data/{local}')\") and "
            f"set data.root = 'data/{local}'")  # fmt: skip


def locate(root: str | Path, where: str) -> HFSplit:
    """The split ``where`` of ``root`` (see the module docstring); ``DatasetError`` naming the path otherwise."""
    root = Path(root)
    target = root / where if where else root
    if glob.has_magic(where):
        files = tuple(sorted(Path(p) for p in glob.glob(str(target)) if Path(p).is_file()))
        if not files:
            raise DatasetError(f"{target}: no file matches this pattern")
        return HFSplit(_file_kind(files, str(target)), str(target), files)
    if target.is_file():
        return HFSplit(_file_kind((target,), str(target)), str(target), (target,))
    if target.is_dir():
        if (target / "state.json").is_file():
            return HFSplit("disk", str(target), (target,))
        if (target / "dataset_dict.json").is_file():
            raise DatasetError(
                f"{target}: a DatasetDict (splits: {', '.join(_splits(target))}): set data.root to it and "
                "data.train / data.val to split names"
            )
        files = tuple(sorted(p for p in target.iterdir() if p.suffix in SUFFIXES and p.is_file()))
        if not files:
            raise DatasetError(
                f"{target}: neither a dataset folder written by save_to_disk (no state.json) nor a folder of "
                f"{' or '.join(SUFFIXES)} files"
            )
        return HFSplit(_file_kind(files, str(target)), str(target), files)
    if (root / "dataset_dict.json").is_file():
        raise DatasetError(f"{root}: the DatasetDict has no split {where!r}; its splits: {', '.join(_splits(root))}")
    if not root.exists() and _HUB_NAME.match(str(root)):
        raise DatasetError(f"{root}: no such local folder; {hub_hint(str(root))}")
    raise DatasetError(f"{target}: no such folder or file (data.format = 'hf' reads local datasets only)")


def _file_kind(files: tuple[Path, ...], name: str) -> Literal["parquet", "arrow"]:
    kinds = {p.suffix for p in files}
    if kinds == {".parquet"}:
        return "parquet"
    if kinds == {".arrow"}:
        return "arrow"
    raise DatasetError(f"{name}: expected .parquet or .arrow files (one kind), got {', '.join(sorted(kinds))}")


def _splits(folder: Path) -> list[str]:
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{folder / 'dataset_dict.json'}: cannot read its split names: {exc}") from None
    return [str(s) for s in splits]


def features_json(split: HFSplit) -> dict[str, Any] | None:
    """The features ``datasets`` recorded for the split, as JSON (``Features.to_dict()``'s form), or None
    when the files carry none (parquet/arrow written by other tools)."""
    if split.kind == "disk":
        info = split.files[0] / "dataset_info.json"
        try:
            return json.loads(info.read_text(encoding="utf-8")).get("features")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise DatasetError(f"{info}: cannot read the features: {exc}") from None
    import pyarrow as pa  # the file kinds only: validating a save_to_disk folder reads JSON alone

    first = split.files[0]
    try:
        if split.kind == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(first)
        else:
            with pa.memory_map(str(first)) as source:
                schema = pa.ipc.open_stream(source).schema
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{first}: cannot read the schema: {exc}") from None
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        return json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None


def _unwrap(feature: Any) -> Any:
    """The item feature of a list feature (``Sequence``/``List``/``LargeList``, or ``[x]`` as datasets < 4
    wrote a plain list), repeatedly; anything else as it is."""
    while True:
        if isinstance(feature, list) and len(feature) == 1:
            feature = feature[0]
        elif isinstance(feature, dict) and feature.get("_type") in _LIST_TYPES:
            feature = feature.get("feature")
        else:
            return feature


def category_names(features: dict[str, Any] | None) -> list[str] | None:
    """The ``ClassLabel`` names of ``objects.category`` (``objects`` a dict of lists or a list of dicts), or
    None when it is no ClassLabel."""
    objects = _unwrap((features or {}).get("objects"))
    category = _unwrap(objects.get("category")) if isinstance(objects, dict) else None
    if isinstance(category, dict) and category.get("_type") == "ClassLabel" and isinstance(category.get("names"), list):
        return [str(n) for n in category["names"]]
    return None


def class_names_of(root: str | Path, where: str) -> list[str]:
    """The ClassLabel names of a split, for ``data.class_names = []``; ``DatasetError`` when it has none."""
    split = locate(root, where)
    names = category_names(features_json(split))
    if names is None:
        raise DatasetError(f"{split.name}: objects.category is no ClassLabel feature, so it names no classes")
    return names
