"""Issue 16, data: a mixed second dataset, augment stages, the new augments, letterbox and single class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from accel_det.config import RecipeError
from accel_det.config_io import load_recipe
from accel_det.data import (
    AUGMENT_ORDER,
    DatasetError,
    MixedDataset,
    MixSampler,
    VOCDetection,
    build_dataset,
    build_train_loader,
    build_transforms,
    collate_fn,
    eval_splits,
    eval_transforms,
    mix_epoch_length,
    to_original,
)
from accel_det.data.transforms import Letterbox

CLASSES = ["circle", "square", "triangle"]


def _voc(root: Path, n: int, size: tuple[int, int] = (40, 30), names: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """``n`` images of ``size`` (w, h), each with one box per name in ``names`` (cycled), split file all.txt."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    w, h = size
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"JPEGImages/im{i}.png")
        name = names[i % len(names)]
        (root / f"Annotations/im{i}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size><object><name>{name}</name>"
            f"<bndbox><xmin>3</xmin><ymin>4</ymin><xmax>{w // 2}</xmax><ymax>{h - 2}</ymax></bndbox></object>"
            "</annotation>"
        )
    (root / "all.txt").write_text("".join(f"im{i}\n" for i in range(n)))
    return root


def _recipe(tmp_path: Path, *overrides: str, path: Path | None = None):
    return load_recipe(path, [f"data.root={tmp_path / 'voc'}", 'data.format="voc"', 'data.train="all.txt"',
                              'data.val="all.txt"', "model.img_dim=32", "data.num_workers=0", "train.seed=7",
                              *overrides])  # fmt: skip


def _mix_recipe(tmp_path: Path, *overrides: str):
    """First set: VOC, 40x30 images; second: the synthetic shapes, 48x48 (the size tells them apart)."""
    return _recipe(tmp_path, f"data.mix.root={tmp_path / 'shapes'}", 'data.mix.format="synthetic"',
                   'data.mix.train="ImageSets/Main/train.txt"', 'data.mix.val="ImageSets/Main/val.txt"',
                   "data.synthetic.num_train=6", "data.synthetic.num_val=2", "data.synthetic.img_size=48",
                   *overrides)  # fmt: skip


def _bad(text: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(None, text.split())
    assert "\n" not in str(info.value)


# 1. config ------------------------------------------------------------------------------------------------------


def test_new_keys_validate_and_resolve(tmp_path: Path) -> None:
    r = load_recipe(None, ["data.mix.rate=0.25", 'data.mix.root="other"'])
    mix = json.loads(r.to_json())["data"]["mix"]  # recipe.json records the resolved values
    assert mix == {"rate": 0.25, "format": "synthetic", "root": "other", "train": "ImageSets/Main/train.txt",
                   "val": "ImageSets/Main/val.txt", "train_images": "", "val_images": ""}  # fmt: skip
    path = tmp_path / "recipe.json"
    path.write_text(r.to_json())
    assert load_recipe(path) == r
    coco = load_recipe(None, ['data.format="coco"', 'data.train_images="tr"', "data.mix.rate=0.5"])
    assert coco.data.mix is not None and (coco.data.mix.train_images, coco.data.mix.val_images) == ("tr", "")
    _bad("data.mix.rate=0", r"data\.mix\.rate: Input should be greater than 0")
    _bad("data.mix.rate=1.0", r"data\.mix\.rate: Input should be less than 1")
    _bad("data.mix.root='x'", r"data\.mix\.rate: Field required")
    _bad("data.mix.rate=0.5 data.mix.rat=1", r"data\.mix\.rat: unknown key \(did you mean 'rate'\?\)")
    _bad("data.mix.rate=0.5 data.mix.format='coco'",
         r"data\.mix\.train: needs a value: data\.mix\.format \('coco'\) differs from data\.format \('synthetic'\)")
    _bad("data.mix.rate=0.5 data.mix.train_images='x'",
         r"data\.mix: train_images/val_images apply only to format = 'coco'")
    _bad("data.format='voc' data.ignore_classes=['dog'] data.mix.rate=0.5 data.mix.format='yolo' data.mix.train=a "
         "data.mix.val=b", r"data\.mix\.format: yolo cannot apply data\.ignore_classes")
    # unknown augments list the valid ones
    _bad("data.augments=['cutout']", "data.augments.0: Input should be 'mosaic', 'photometric', 'color_jitter', "
         "'grayscale', 'zoom_out', 'iou_crop', 'scale_jitter', 'hflip' or 'vflip'")
    _bad("data.letterbox=1", r"data\.letterbox: Input should be a valid boolean")


def test_stages_config_and_stage_of(tmp_path: Path) -> None:
    toml = tmp_path / "r.toml"
    toml.write_text('[data]\naugments = ["hflip", "zoom_out"]\n[[data.stages]]\nepochs = 3\n'
                    '[[data.stages]]\nepochs = 2\naugments = []\n')  # fmt: skip
    r = load_recipe(toml)
    assert [s.augments for s in r.data.stages] == [["hflip", "zoom_out"], []]  # default: data.augments
    assert r.data.stage_starts() == [0, 3]
    assert [r.data.stage_of(e)[0] for e in range(7)] == [0, 0, 0, 1, 1, 1, 1]  # the last stage runs on
    assert r.data.stage_of(4) == (1, [])
    assert load_recipe(None).data.stage_of(9) == (0, ["hflip"])  # no stages: data.augments throughout
    toml.write_text("[[data.stages]]\nepochs = 0\n")
    with pytest.raises(RecipeError, match=r"data\.stages\.0\.epochs: Input should be greater than 0"):
        load_recipe(toml)
    toml.write_text('[[data.stages]]\nepochs = 1\naugments = ["cutmix"]\n')
    with pytest.raises(RecipeError, match=r"data\.stages\.0\.augments\.0: Input should be 'mosaic', 'photometric'"):
        load_recipe(toml)


def test_single_cls_config() -> None:
    r = load_recipe(None, ["data.single_cls=true"])
    assert (r.num_classes, r.model.num_classes, r.output_class_names) == (1, 1, ["object"])
    assert r.data.class_names == CLASSES  # still what the annotations are read and checked with
    assert load_recipe(None, ["data.single_cls=true", "data.single_cls_name='face'"]).output_class_names == ["face"]
    assert load_recipe(None).output_class_names == CLASSES
    _bad("data.single_cls=true model.num_classes=3", r"model\.num_classes = 3 but data\.single_cls = true trains 1")
    _bad("data.single_cls_name=''", r"data\.single_cls_name: must be a non-empty name")


# 2. mixed second dataset ----------------------------------------------------------------------------------------


def test_mix_sampler_rate_length_and_determinism() -> None:
    assert mix_epoch_length(70, 0.3) == 100 and mix_epoch_length(10, 0.5) == 20
    sampler = MixSampler((70, 13), rate=0.3, seed=5)
    assert len(sampler) == 100
    seen2, total = 0, 0
    for epoch in range(40):
        sampler.set_epoch(epoch)
        order = sampler.indices()
        assert order.min() >= 0 and order.max() < 83 and len(order) == 100
        seen2 += int((order >= 70).sum())
        total += len(order)
        first = order[order < 70]
        # within a set, a permutation: no index twice before every index once
        assert len(set(first[:70].tolist())) == min(len(first), 70)
    # binomial: 4 standard deviations
    assert abs(seen2 - 0.3 * total) < 4 * math.sqrt(total * 0.3 * 0.7), seen2 / total
    sampler.set_epoch(3)
    again = MixSampler((70, 13), rate=0.3, seed=5)
    again.set_epoch(3)
    assert list(sampler) == list(again)  # a function of (seed, epoch): any process, after a resume
    again.set_epoch(4)
    assert list(sampler) != list(again)
    assert list(sampler) != list(MixSampler((70, 13), rate=0.3, seed=6))


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_mix_sampler_shards_disjoint_and_covering() -> None:
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader

    Accelerator(cpu=True)
    sampler = MixSampler((45, 9), rate=0.4, seed=1)  # 75 samples: 18 batches of 4, the last 3 dropped
    for epoch in (0, 1, 5):
        sampler.set_epoch(epoch)
        reference = sampler.indices()[: (75 // 4) * 4].view(-1, 4).tolist()
        shards = []
        for rank in range(2):
            loader = DataLoader(_Indices(54), batch_size=4, sampler=sampler, drop_last=True)
            # what accelerator.prepare does on 2 processes (batch-wise sharding of a custom sampler)
            shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                        use_seedable_sampler=True, data_seed=1)  # fmt: skip
            shard.set_epoch(epoch)  # reaches the sampler, as the trainer's call does
            shards.append([b.tolist() for b in shard])
        assert len(shards[0]) == len(shards[1]) == 9
        assert shards[0] == reference[0::2] and shards[1] == reference[1::2]  # every other batch
        flat = [i for s in shards for b in s for i in b]
        assert sorted(flat) == sorted(i for b in reference for i in b)  # together: the whole epoch, once


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_mixed_dataset_through_builder_and_accelerator(tmp_path: Path) -> None:
    from accelerate import Accelerator

    _voc(tmp_path / "voc", 9)
    recipe = _mix_recipe(tmp_path, "data.mix.rate=0.4", "data.batch_size=3", "data.augments=['hflip', 'vflip']")
    ds = build_dataset(recipe, "train")
    assert isinstance(ds, MixedDataset) and ds.sizes == (9, 6) and len(ds) == 15
    assert ds.num_objects() == 9 + ds.second.num_objects() and ds.second.num_objects() > 0
    assert ds.second.seed != ds.first.seed == 7  # the two sets do not draw the same augmentations
    assert len(ds.records) == 15 and ds.image_path(9) == ds.second.records[0].path
    assert eval_splits(recipe) == ["val", "val2"] and eval_splits(_recipe(tmp_path)) == ["val"]
    val2 = build_dataset(recipe, "val2")
    assert len(val2) == 2 and val2[0][0].shape == (3, 32, 32) and val2[0][1]["orig_size"] == (48, 48)
    with pytest.raises(ValueError, match=r"need \[data\.mix\]"):
        build_dataset(_recipe(tmp_path), "val2")

    loader = Accelerator(cpu=True).prepare(build_train_loader(recipe, ds))
    assert len(loader) == mix_epoch_length(9, 0.4) // 3 == 5
    sizes = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        loader.set_epoch(epoch)
        sizes.append([tuple(t["orig_size"].tolist()) for _, ts in loader for t in ts])
    assert sizes[0] == sizes[2] != sizes[1]  # the order is a function of the epoch
    assert {s for epoch in sizes for s in epoch} == {(30, 40), (48, 48)}
    # the problems, warnings and the "replaced" contract go through: a broken image of the second set is
    # replaced by another of the second set
    bad = ds.second.records[2].path
    bad.write_bytes(b"not a png")
    image, target = ds[9 + 2]
    assert target["orig_size"] == (48, 48) and target["replaced"][0].startswith(f"{bad}: ")
    assert ds.warnings == [*ds.first.warnings, *ds.second.warnings]
    ds.set_epoch(4)
    assert ds.first.epoch == ds.second.epoch == ds.epoch == 4


def test_mix_class_names_must_agree(tmp_path: Path) -> None:
    _voc(tmp_path / "voc", 3)
    _voc(tmp_path / "voc2", 3, names=("circle", "dog", "cat"))
    recipe = _recipe(tmp_path, "data.mix.rate=0.5", f"data.mix.root={tmp_path / 'voc2'}")
    with pytest.raises(DatasetError, match=r"voc2/all\.txt: unknown class names cat \(1, .*\), dog \(1, .*\)"):
        build_dataset(recipe, "train")


# 3. stages ------------------------------------------------------------------------------------------------------


STAGE0 = ["color_jitter", "scale_jitter", "hflip", "vflip"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stages_switch_at_the_boundary_in_every_worker(tmp_path: Path, workers: int) -> None:
    _voc(tmp_path / "voc", 8)
    toml = tmp_path / "stages.toml"
    toml.write_text(f"[[data.stages]]\nepochs = 2\naugments = {json.dumps(STAGE0)}\n"
                    "[[data.stages]]\nepochs = 1\naugments = []\n")  # fmt: skip
    staged = _recipe(tmp_path, "data.batch_size=2", f"data.num_workers={workers}", path=toml)
    ds = build_dataset(staged, "train")
    loader = build_train_loader(staged, ds)  # persistent workers: built once, never rebuilt
    # the same samples read without stages, with each stage's augments throughout
    refs = {0: build_dataset(_recipe(tmp_path, f"data.augments={json.dumps(STAGE0)}"), "train"),
            1: build_dataset(_recipe(tmp_path, "data.augments=[]"), "train")}  # fmt: skip
    plain_differs = False
    for epoch in (0, 1, 2, 5, 0):  # a jump ahead (resume) into the last stage, which runs on, and back
        stage = staged.data.stage_of(epoch)[0]
        ds.set_epoch(epoch)
        got = {int(t["image_id"]): (img, t["boxes"]) for imgs, ts in loader for img, t in zip(imgs, ts)}
        assert len(got) == 8
        ref = refs[stage]
        ref.set_epoch(epoch)
        for i, (img, boxes) in got.items():
            want, target = ref[i]
            assert torch.equal(img, want.as_subclass(torch.Tensor)), (epoch, i)
            assert torch.equal(boxes, target["boxes"].as_subclass(torch.Tensor))
            if stage == 0:
                refs[1].set_epoch(epoch)
                plain_differs |= not torch.equal(img, refs[1][i][0].as_subclass(torch.Tensor))
    assert plain_differs  # stage 0 really augments


# 4. augments ----------------------------------------------------------------------------------------------------


def _square_sample(w: int = 80, h: int = 60, box: tuple[int, int, int, int] = (10, 20, 30, 45)):
    pixels = torch.full((3, h, w), 40, dtype=torch.uint8)
    pixels[:, box[1] : box[3], box[0] : box[2]] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                          canvas_size=(h, w)),  # fmt: skip
        "labels": torch.tensor([1]),
        "difficult": torch.tensor([False]),
        "image_id": 0,
        "orig_size": (h, w),
    }
    return tv_tensors.Image(pixels), target


def _bright_box(image: torch.Tensor, level: int = 200) -> torch.Tensor:
    ys, xs = torch.nonzero((image > level).all(0), as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


@pytest.mark.parametrize("name", ["scale_jitter", "vflip", "color_jitter", "grayscale"])
def test_new_augments_keep_boxes_on_their_pixels(name: str) -> None:
    tf = build_transforms(True, 64, [name])
    moved = 0
    for seed in range(16):
        torch.manual_seed(seed)
        image, target = tf(*_square_sample())
        assert image.shape == (3, 64, 64)
        boxes = _plain(target["boxes"])
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()  # never a degenerate box
        if name in ("color_jitter", "grayscale"):  # pixels change, nothing moves
            torch.testing.assert_close(boxes, torch.tensor([[8.0, 21.3333, 24.0, 48.0]]), atol=1e-3, rtol=0)
            moved += not torch.equal(image, build_transforms(False, 64, [])(*_square_sample())[0])
            continue
        ref = _bright_box(image)
        torch.testing.assert_close(boxes[0], ref, atol=1.5, rtol=0)
        moved += not torch.allclose(ref, torch.tensor([8.0, 21.0, 24.0, 48.0]), atol=1.5)
    assert moved  # the augment did something in 16 draws (grayscale: p = 0.1)
    # boxes pushed off the canvas by a zoom in are dropped, not kept degenerate
    tf = build_transforms(True, 64, ["scale_jitter"])
    for seed in range(16):
        torch.manual_seed(seed)
        _, target = tf(*_square_sample(box=(0, 0, 4, 4)))
        boxes = _plain(target["boxes"])
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all() and len(target["labels"]) == len(boxes)


def test_every_augment_runs_on_gray_and_empty_images() -> None:
    tf = build_transforms(True, 32, AUGMENT_ORDER, channels=1)
    image, target = _square_sample()
    gray = tv_tensors.Image(image[:1])
    for seed in range(6):
        torch.manual_seed(seed)
        out, t = tf(gray, dict(target))
        assert out.shape == (1, 32, 32) and len(t["labels"]) == len(t["boxes"]) == len(t["difficult"])
    none = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(60, 80))
    empty = dict(target, boxes=none, labels=torch.zeros(0, dtype=torch.int64),
                 difficult=torch.zeros(0, dtype=torch.bool))  # fmt: skip
    out, t = build_transforms(True, 32, AUGMENT_ORDER)(image, empty)
    assert out.shape == (3, 32, 32) and t["boxes"].shape == (0, 4)


# 5. letterbox ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("w", "h", "box"), [(80, 40, (10, 5, 30, 25)), (41, 77, (3, 50, 37, 70))])
def test_letterbox_keeps_aspect_and_round_trips(w: int, h: int, box: tuple[int, int, int, int]) -> None:
    image, target = _square_sample(w, h, box)
    for tf in (build_transforms(False, 64, [], letterbox=True), build_transforms(True, 64, [], letterbox=True)):
        out, t = tf(image, target)
        assert out.shape == (3, 64, 64)
        got = _plain(t["boxes"])
        torch.testing.assert_close(got[0], _bright_box(out, 150), atol=1.0, rtol=0)  # the box is on its pixels
        # one scale for both axes: the box keeps its aspect ratio
        bw, bh = got[0, 2] - got[0, 0], got[0, 3] - got[0, 1]
        assert abs(bw / bh - (box[2] - box[0]) / (box[3] - box[1])) < 0.05
        # the padding is the mean colour, centred
        side = out[:, :, 0] if w < h else out[:, 0, :]
        assert (side.T == torch.tensor([123, 117, 104], dtype=torch.uint8)).all()
        back = to_original(got, (h, w), 64, letterbox=True)
        torch.testing.assert_close(back, torch.tensor([box], dtype=torch.float32), atol=0.5, rtol=0)
    # a prediction reaching into the padding is clipped to the image
    assert to_original(torch.tensor([[-10.0, -10.0, 100.0, 100.0]]), (h, w), 64, True).tolist() == [[0, 0, w, h]]
    # plain resize: each axis scaled back
    plain = build_transforms(False, 64, [])(image, target)[1]["boxes"]
    torch.testing.assert_close(to_original(_plain(plain), (h, w), 64, letterbox=False),
                               torch.tensor([box], dtype=torch.float32), atol=1e-4, rtol=0)  # fmt: skip


def test_letterbox_from_the_recipe(tmp_path: Path) -> None:
    _voc(tmp_path / "voc", 2, size=(50, 20))
    recipe = _recipe(tmp_path, "data.letterbox=true")
    image, target = build_dataset(recipe, "val")[0]
    assert image.shape == (3, 32, 32) and target["orig_size"] == (20, 50)
    back = to_original(_plain(target["boxes"]), target["orig_size"], 32, recipe.data.letterbox)
    torch.testing.assert_close(back, torch.tensor([[2.0, 3.0, 25.0, 18.0]]), atol=0.5, rtol=0)
    x = eval_transforms(recipe)(tv_tensors.Image(torch.zeros(3, 20, 50, dtype=torch.uint8)))  # predict's call
    assert x.shape == (3, 32, 32) and x[:, 0, 0].tolist() == [123, 117, 104]
    steps = build_dataset(recipe, "train").transforms.transforms
    assert any(isinstance(t, Letterbox) for t in steps) and not any(isinstance(t, v2.Resize) for t in steps)


# 6. single class ------------------------------------------------------------------------------------------------


def test_single_cls_reads_all_names_and_trains_one(tmp_path: Path) -> None:
    _voc(tmp_path / "voc", 6)
    recipe = _recipe(tmp_path, "data.single_cls=true")
    assert recipe.num_classes == 1
    for split in ("train", "val"):
        ds = build_dataset(recipe, split)
        assert ds.class_names == ["object"] and ds.category_ids == [1]
        labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
        assert labels.tolist() == [1] * 6
    loader = build_train_loader(recipe, build_dataset(recipe, "train"))
    assert all((t["labels"] == 1).all() for _, ts in loader for t in ts)
    # the dataset's own names are still checked
    with pytest.raises(DatasetError, match=r"unknown class names triangle \(2, "):
        build_dataset(_recipe(tmp_path, "data.single_cls=true", "data.class_names=['circle', 'square']"), "train")
    ds = VOCDetection(tmp_path / "voc", "all.txt", CLASSES)
    ds.merge_classes("thing")
    assert ds.num_objects() == 6 and {int(r.labels[0]) for r in ds.records} == {1}
    # YOLO numbers classes from 0: predictions written in its numbering say class 0
    (tmp_path / "y/images").mkdir(parents=True)
    (tmp_path / "y/labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "y/images/a.png")
    (tmp_path / "y/labels/a.txt").write_text("2 .5 .5 .2 .2\n0 .3 .3 .2 .2\n")
    yolo = load_recipe(None, [f"data.root={tmp_path / 'y'}", 'data.format="yolo"', 'data.train="images"',
                              'data.val="images"', "data.single_cls=true"])  # fmt: skip
    ds = build_dataset(yolo, "val")
    assert ds.category_ids == [0] and ds[0][1]["labels"].tolist() == [1, 1]


def test_doctor_scans_both_sets_and_val2(tmp_path: Path) -> None:
    from accel_det.data.doctor import check_data

    _voc(tmp_path / "voc", 3)
    report = check_data(_mix_recipe(tmp_path, "data.mix.rate=0.5"), workers=0)
    assert list(report.splits) == ["train", "val", "val2"]
    assert (report.splits["train"].images, report.splits["val"].images, report.splits["val2"].images) == (9, 3, 2)
    assert report.can_train
    assert list(check_data(_recipe(tmp_path), workers=0).splits) == ["train", "val"]


def test_collate_keeps_mixed_and_staged_samples_stackable(tmp_path: Path) -> None:
    _voc(tmp_path / "voc", 4)
    recipe = _mix_recipe(tmp_path, "data.mix.rate=0.5", "data.letterbox=true", "data.augments=['scale_jitter']")
    ds = build_dataset(recipe, "train")
    images, targets = collate_fn([ds[0], ds[5]])
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2
