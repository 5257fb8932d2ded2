"""Hugging Face datasets as input (``data.format = "hf"``): a tiny cppe-5-like dataset built in memory (Image,
Sequence/ClassLabel features; 64 px images, one gray, one RGBA, one EXIF-rotated JPEG, one broken), saved with
``save_to_disk`` or as parquet/arrow files and read through the builder; boxes, classes from the ClassLabel,
the hub-name refusal, forked workers, the data doctor, and one epoch of training. The network is blocked in
every test: nothing may try to reach the Hub."""

from __future__ import annotations

import io
import json
import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from accel_det.config_io import load_recipe
from accel_det.data import build_dataset, collate_fn
from accel_det.errors import DataError, RecipeError

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

from accel_det.data.hf import HFDetection  # noqa: E402 - needs pyarrow, which comes with datasets

DEMO = Path(__file__).parents[1] / "recipes" / "demo.toml"
NAMES = ["Coverall", "Face_Shield", "Gloves"]
# what row i of _rows() loads as: (image_id, (h, w), boxes xyxy, labels 1..3)
EXPECTED: list[tuple[int, tuple[int, int], list[list[float]], list[int]]] = [
    (11, (48, 64), [[4, 6, 24, 16], [30, 20, 40, 32]], [1, 2]),
    (12, (64, 64), [[0, 0, 16, 16]], [3]),  # gray
    (13, (64, 48), [[2, 40, 22, 60]], [2]),  # stored 64x48 with EXIF orientation 6: shown (and annotated) 48x64
    (14, (64, 64), [], []),  # RGBA, no objects
    (15, (48, 64), [[50, 40, 64, 48]], [1]),  # a box clipped to the image; an inverted one dropped
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any internet connection attempt fails the test (local sockets, which DataLoader workers use, work);
    parquet conversions go to a cache under tmp_path."""
    connect = socket.socket.connect

    def local_only(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        connect(sock, address)

    def refuse(address: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _encoded(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", orientation: int | None = None,
             seed: int = 0) -> bytes:  # fmt: skip
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, fmt)
    else:
        exif = img.getexif()
        exif[0x0112] = orientation
        img.save(buf, fmt, exif=exif)
    return buf.getvalue()


def _rows() -> list[dict[str, Any]]:
    """Five images in the cppe-5 layout; objects as a list of dicts (the generic form)."""

    def obj(bbox: list[float], category: int) -> dict[str, Any]:
        return {"bbox": bbox, "category": category}

    return [
        {"image_id": 11, "image": _encoded((64, 48)), "width": 64, "height": 48,
         "objects": [obj([4, 6, 20, 10], 0), obj([30, 20, 10, 12], 1)]},
        {"image_id": 12, "image": _encoded((64, 64), "L", seed=1), "width": 64, "height": 64,
         "objects": [obj([0, 0, 16, 16], 2)]},
        {"image_id": 13, "image": _encoded((64, 48), fmt="JPEG", orientation=6, seed=2), "width": 48, "height": 64,
         "objects": [obj([2, 40, 20, 20], 1)]},
        {"image_id": 14, "image": _encoded((64, 64), "RGBA", seed=3), "width": 64, "height": 64, "objects": []},
        {"image_id": 15, "image": _encoded((64, 48), seed=4), "width": 64, "height": 48,
         "objects": [obj([50, 40, 30, 30], 0), obj([10, 10, -5, 5], 2)]},
    ]  # fmt: skip


def _dataset(rows: list[dict[str, Any]] | None = None, dict_of_lists: bool = True) -> Any:
    """``rows`` as a datasets.Dataset: objects a ``Sequence`` of a dict (stored as a dict of lists, as cppe-5)
    or a list of dicts."""
    from datasets import ClassLabel, Features, Sequence, Value
    from datasets import Image as ImageFeature

    rows = _rows() if rows is None else rows
    obj = {"bbox": Sequence(Value("float32"), length=4), "category": ClassLabel(names=NAMES)}
    features = Features({
        "image_id": Value("int64"), "image": ImageFeature(), "width": Value("int32"), "height": Value("int32"),
        "objects": Sequence(obj) if dict_of_lists else [obj],
    })  # fmt: skip
    columns: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in rows[0]}
    columns["image"] = [{"bytes": b, "path": None} for b in columns["image"]]
    if dict_of_lists:
        columns["objects"] = [{"bbox": [o["bbox"] for o in objs], "category": [o["category"] for o in objs]}
                              for objs in columns["objects"]]  # fmt: skip
    return datasets.Dataset.from_dict(columns, features=features)


def _save_dict(tmp_path: Path) -> Path:
    root = tmp_path / "cppe_like"
    datasets.DatasetDict(train=_dataset(), validation=_dataset(_rows()[:3])).save_to_disk(str(root))
    return root


def _recipe(tmp_path: Path, root: Path, *extra: str, train: str = "train", val: str = "validation") -> Any:
    return load_recipe(DEMO, [
        "data.format='hf'", f"data.root='{root}'", f"data.train='{train}'", f"data.val='{val}'",
        "data.class_names=[]", "data.num_workers=0", "model.img_dim=64", f"output.root='{tmp_path / 'runs'}'", *extra,
    ])  # fmt: skip


def _raw(ds: Any) -> list[tuple[int, tuple[int, int], list[list[float]], list[int]]]:
    """Every sample as (image_id, image (h, w), boxes, labels), untransformed."""
    ds.transforms = None
    out = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and target["orig_size"] == tuple(image.shape[1:])
        out.append((target["image_id"], tuple(image.shape[1:]), target["boxes"].tolist(), target["labels"].tolist()))
    return out


def test_dataset_dict_through_the_builder(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, _save_dict(tmp_path))
    assert recipe.data.class_names == NAMES and recipe.num_classes == 3  # from the ClassLabel, at validation
    ignoring = _recipe(tmp_path, Path(recipe.data.root), "data.ignore_classes=['Face_Shield']")
    assert ignoring.data.class_names == ["Coverall", "Gloves"] and ignoring.num_classes == 2
    train = build_dataset(recipe, "train")
    assert isinstance(train, HFDetection) and train.category_ids == [0, 1, 2]
    assert _raw(train) == EXPECTED
    (problem,) = train.problems
    assert problem.kind == "invalid_box" and problem.action == "object dropped"
    assert problem.file == f"{recipe.data.root}/train[row 4]" and "object 1" in problem.detail
    assert len(build_dataset(recipe, "val")) == 3
    # the training pipeline: resized to img_dim, boxes scaled with the pixels
    image, target = build_dataset(_recipe(tmp_path, Path(recipe.data.root), "data.augments=[]"), "train")[0]
    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[4, 8, 24, 64 / 3], [30, 80 / 3, 40, 128 / 3]]))  # fmt: skip


def test_list_of_dicts_single_dataset_and_explicit_class_names(tmp_path: Path) -> None:
    _dataset(dict_of_lists=False).save_to_disk(str(tmp_path / "single"))
    ds = HFDetection(tmp_path, "single", ["Gloves", "Coverall"], ignore_classes=["Face_Shield"], on_bad_sample="skip")
    # labels follow class_names' order; category_ids map them back to the ClassLabel's indices
    assert ds.class_names == ["Gloves", "Coverall"] and ds.category_ids == [2, 0]
    assert [r.labels.tolist() for r in ds.records] == [[2], [1], [], [], [2]]
    assert sorted(p.kind for p in ds.problems) == ["ignored_class", "ignored_class", "invalid_box"]
    with pytest.raises(DataError, match=r"single: unknown class names Face_Shield \(2, first in .*single\[row 0\]\)"):
        HFDetection(tmp_path, "single", ["Gloves", "Coverall"], on_bad_sample="skip")
    with pytest.raises(DataError, match=r"ClassLabel of objects.category .* has no class 'Mask'"):
        HFDetection(tmp_path, "single", ["Gloves", "Mask"], on_bad_sample="skip")


def test_parquet_and_arrow_files(tmp_path: Path) -> None:
    ds = _dataset()
    ds.to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "parts").mkdir()
    for i in range(2):  # shards in order: row i of the split is row i of the dataset
        ds.shard(2, i, contiguous=True).to_parquet(str(tmp_path / "parts" / f"train-{i:05d}-of-00002.parquet"))
    saved = tmp_path / "disk"
    ds.save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow")).name
    for train in ("train.parquet", "parts/train-*.parquet", "parts", f"disk/{arrow}"):
        recipe = _recipe(tmp_path, tmp_path, train=train, val=train)
        assert recipe.data.class_names == NAMES  # parquet/arrow schemas carry the features too
        assert _raw(build_dataset(recipe, "train")) == EXPECTED, train


def test_hub_names_and_missing_data_fail_in_one_line(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, _save_dict(tmp_path))
    hub = recipe.model_copy(update={"data": recipe.data.model_copy(update={"root": "someuser/somedata"})})
    with pytest.raises(DataError) as err:
        build_dataset(hub, "train")
    line = str(err.value)
    assert "\n" not in line and line.startswith("someuser/somedata: no such local folder; accel_det never downloads")
    assert "load_dataset('someuser/somedata').save_to_disk('data/somedata')" in line
    with pytest.raises(RecipeError, match=r"data.class_names: \[\] takes the dataset's ClassLabel names, but "
                       r"someuser/somedata: no such local folder") as err:  # fmt: skip
        _recipe(tmp_path, Path("someuser/somedata"))
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"the DatasetDict has no split 'test'; its splits: train, validation"):
        _recipe(tmp_path, Path(recipe.data.root), train="test")
    with pytest.raises(RecipeError, match=r"data.class_names: needs at least one class name"):
        load_recipe(DEMO, ["data.class_names=[]"])
    with pytest.raises(DataError, match=r"no split 'test'"):
        build_dataset(recipe.model_copy(update={"data": recipe.data.model_copy(update={"val": "test"})}), "val")


def test_bad_rows_and_image_paths(tmp_path: Path) -> None:
    rows = _rows()[:3]
    png = tmp_path / "outside.png"
    png.write_bytes(_encoded((64, 48)))
    rows[1]["image"] = b"not an image"
    data = _dataset(rows).to_dict()
    data["image"][2] = {"bytes": None, "path": str(png)}  # an image kept as a file beside the dataset
    # save_to_disk would embed the file's bytes: a parquet file written as it is keeps the bare path
    pq.write_table(datasets.Dataset.from_dict(data, features=_dataset(rows).features).data.table,
                   tmp_path / "bad.parquet")  # fmt: skip
    ds = HFDetection(tmp_path, "bad.parquet", [], on_bad_sample="error")
    assert ds[2][0].shape == (3, 48, 64)
    with pytest.raises(DataError, match=r"bad.parquet\[row 1\]: cannot read image: cannot identify image file"):
        ds[1]
    skip = HFDetection(tmp_path, "bad.parquet", [], on_bad_sample="skip")
    assert skip[1][1]["replaced"][0].startswith(f"{tmp_path}/bad.parquet[row 1]: cannot read image")
    png.unlink()  # indexing now drops that row; an earlier dataset names the file when it loads it
    with pytest.raises(DataError, match=rf"bad.parquet\[row 2\] \({png}\): image file missing"):
        ds[2]
    again = HFDetection(tmp_path, "bad.parquet", [], on_bad_sample="skip")
    assert len(again) == 2 and [p.kind for p in again.problems] == ["missing_image"]


def test_samples_load_in_forked_workers_and_after_pickling(tmp_path: Path) -> None:
    ds = build_dataset(_recipe(tmp_path, _save_dict(tmp_path)), "val")
    here = [(t["image_id"], img.shape) for img, t in (ds[i] for i in range(len(ds)))]  # maps the files here first
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_fn,
                                         multiprocessing_context="fork")  # fmt: skip
    there = [(t["image_id"], img.shape) for images, targets in loader for img, t in zip(images, targets)]
    assert there == here
    # what a spawned worker receives: the file names, not the mapped table
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.records[0].image.rows._values is None and copy[2][1]["image_id"] == 13


def test_check_data_decodes_rows(tmp_path: Path) -> None:
    from accel_det.data.doctor import check_data

    rows = _rows()
    rows[3]["image"] = _encoded((64, 64))[:40]  # a cut PNG: the header reads, the pixels do not
    root = tmp_path / "doc"
    datasets.DatasetDict(train=_dataset(rows), validation=_dataset(rows[:2])).save_to_disk(str(root))
    report = check_data(_recipe(tmp_path, root), workers=2)  # rows reach the doctor's processes pickled
    found = {(f.split, f.kind): f.files for f in report.findings}
    assert found[("train", "unreadable_image")] == [f"{root}/train[row 3]"]
    assert found[("train", "exif_rotated")] == [f"{root}/train[row 2]"]
    assert found[("train", "mode_converted")] == [f"{root}/train[row 1]"]
    assert found[("train", "invalid_box")] == [f"{root}/train[row 4]"]
    assert found[("train", "box_clipped")] == [f"{root}/train[row 4]"]
    assert report.splits["train"].readable == 4 and report.can_train


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trains_one_epoch(tmp_path: Path) -> None:
    from accel_det.engine.trainer import run_training

    root = tmp_path / "data"
    rows = _rows() * 4  # 20 images
    for i, row in enumerate(rows):
        row["image_id"] = i
    datasets.DatasetDict(train=_dataset(rows), validation=_dataset(_rows())).save_to_disk(str(root))
    recipe = _recipe(tmp_path, root, "model.name='faceboxes'", "model.img_dim=128", "data.batch_size=4",
                     "train.max_epoch=1", "train.log_freq=1", "scheduler.warmup_iters=2", "eval.freq=1",
                     "output.checkpoint_freq=1")  # fmt: skip
    state = run_training(recipe)
    assert state is not None and state.epoch == 1 and state.global_step == 5
    run_dir = recipe.run_dir()
    assert (run_dir / "model.safetensors").is_file()
    assert json.loads((run_dir / "recipe.json").read_text())["data"]["class_names"] == NAMES
    evals = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["num_images"] == 5
