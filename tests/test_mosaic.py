"""The "mosaic" augment (data/mosaic.py): where the parts and their boxes land, clipping, per-sample randomness
across workers and epochs, stages and validation without it, and a staged recipe that trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from accel_det.config_io import load_recipe
from accel_det.data import build_dataset, build_transforms, collate_fn
from accel_det.data.common import DatasetError
from accel_det.data.dataset import DetectionDataset, StagedTransforms
from accel_det.data.mosaic import Mosaic, MosaicDraw, combine, draw_mosaic
from accel_det.data.transforms import MEAN_GRAY, MEAN_RGB
from accel_det.engine.hooks import Hook, TrainState

REPO = Path(__file__).parents[1]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # each part's object


def _part(j: int, hw: tuple[int, int] = (40, 40), box: tuple[int, int, int, int] = (10, 10, 30, 30)):
    """A dark image with one object of COLOURS[j] (label j + 1) at ``box``."""
    h, w = hw
    image = torch.full((3, h, w), 30, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[j], dtype=torch.uint8).view(3, 1, 1)
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=hw),
        "labels": torch.tensor([j + 1]),
        "difficult": torch.tensor([j == 3]),
        "image_id": 100 + j,
        "orig_size": hw,
        "file": f"part{j}.png",
    }
    return tv_tensors.Image(image), target


def _inside_colour(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mean colour of a box's interior, one pixel in from each edge (the resize blends the edge pixels)."""
    x0, y0, x1, y1 = box.round().long().tolist()
    return image[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].float().mean(dim=(1, 2))


def test_boxes_land_where_their_parts_were_pasted() -> None:
    # window = the canvas' middle S x S (scale 1), centre at its middle: 40 px parts at gain 0.5 -> 32 px parts
    # tiling the 64 px output; the part's box (10..30) -> 8..24 inside each quadrant
    parts = [_part(j) for j in range(4)]
    draw = MosaicDraw((1, 2, 3), (64.0, 64.0), (0.5, 0.5, 0.5, 0.5), (32.0, 32.0, 64.0))
    image, target = combine(parts, draw, 64, MEAN_RGB)
    assert image.shape == (3, 64, 64)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    expected = torch.tensor([[8, 8, 24, 24], [40, 8, 56, 24], [8, 40, 24, 56], [40, 40, 56, 56]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected)
    for box, colour in zip(boxes, COLOURS, strict=True):
        torch.testing.assert_close(_inside_colour(image, box), torch.tensor(colour).float(), atol=1, rtol=0)
    assert target["labels"].tolist() == [1, 2, 3, 4] and target["difficult"].tolist() == [False] * 3 + [True]
    assert (target["image_id"], target["orig_size"], target["file"]) == (100, (40, 40), "part0.png")  # i's

    # the whole 2S canvas as the window (scale 1/2), parts of other shapes: each keeps its aspect ratio, touches
    # the centre (32, 32) with its corner, and the rest is the mean colour
    parts = [_part(0, (40, 40)), _part(1, (20, 40), (0, 0, 20, 10)), _part(2, (40, 20), (5, 20, 15, 40)),
             _part(3, (40, 40), (20, 20, 40, 40))]  # fmt: skip
    draw = MosaicDraw((1, 2, 3), (64.0, 64.0), (1.0, 1.0, 1.0, 0.5), (0.0, 0.0, 128.0))
    image, target = combine(parts, draw, 64, MEAN_RGB)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    # part 0: 32 x 32 at (0, 0); part 1: 16 x 32 at (32, 16); part 2: 32 x 16 at (16, 32); part 3: 16 x 16 at 32
    expected = torch.tensor([[8, 8, 24, 24], [32, 16, 48, 24], [20, 48, 28, 64], [40, 40, 48, 48]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected)
    for box, colour in zip(boxes, COLOURS, strict=True):
        torch.testing.assert_close(_inside_colour(image, box), torch.tensor(colour).float(), atol=1, rtol=0)
    mean = torch.tensor(MEAN_RGB, dtype=torch.uint8).view(3, 1)
    assert torch.equal(image[:, :16, 32:].reshape(3, -1), mean.expand(3, 16 * 32))  # above part 1
    assert torch.equal(image[:, 32:, :16].reshape(3, -1), mean.expand(3, 32 * 16))  # left of part 2
    assert torch.equal(image[:, 48:, 48:].reshape(3, -1), mean.expand(3, 16 * 16))  # past part 3


def test_clipping_at_the_edge_and_drop_of_what_is_cut_off() -> None:
    # centre near the canvas' top-left corner, window at the corner: part 0 (i) is mostly off the output
    parts = [_part(0, (40, 40), (0, 0, 40, 35)), _part(1), _part(2), _part(3, (40, 40), (36, 36, 40, 40))]
    draw = MosaicDraw((1, 2, 3), (33.0, 33.0), (1.5, 1.5, 1.5, 1.5), (0.0, 0.0, 66.0))
    image, target = combine(parts, draw, 64, MEAN_RGB)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    # 40 px parts at gain 1.5 and scale 64/66: 93 px, the centre at 32; part 0 spans (-61, -61)..(32, 32)
    assert boxes.min() >= 0 and boxes.max() <= 64  # clipped to the output
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 32.0, 20.375]), atol=0.05, rtol=0)  # cut at x, y = 0
    assert boxes[1].tolist()[2:] == [64.0, pytest.approx(32 - 93 + 69.75, abs=0.05)]  # cut at the right edge
    assert boxes[3, 0] == 64.0  # part 3's box lies past the right edge: no width left
    tf = build_transforms(True, 64, ["mosaic"])
    assert isinstance(tf, Mosaic)
    image, out = tf.apply(*parts[0], 4, lambda j: parts[j], draw=draw)
    # the cut-off box is dropped together with its label and flag; the others stay, in order
    assert out["labels"].tolist() == [1, 2, 3] and out["difficult"].tolist() == [False, False, False]
    assert len(out["boxes"]) == 3 and image.shape == (3, 64, 64)


def test_draws_are_in_range_and_a_gray_image_gets_the_gray_fill() -> None:
    for seed in range(20):
        torch.manual_seed(seed)
        d = draw_mosaic(5, 64)
        left, top, side = d.window
        assert all(0 <= p < 5 for p in d.partners) and 64 <= side <= 128
        assert all(32 <= c <= 96 for c in d.centre) and all(0.5 <= s <= 1.5 for s in d.scales)
        assert 0 <= left <= d.centre[0] <= left + side <= 128 and 0 <= top <= d.centre[1] <= top + side <= 128
    image, target = _part(0)
    gray = tv_tensors.Image(image[:1])
    out, t = combine([(gray, target)] * 4, MosaicDraw((0, 0, 0), (64.0, 64.0), (0.5,) * 4, (0.0, 0.0, 128.0)), 64,
                     MEAN_GRAY)  # fmt: skip
    assert out.shape == (1, 64, 64) and int(out[0, 0, 0]) == MEAN_GRAY and len(t["boxes"]) == 4


def _recipe(tmp: Path, *extra: str):
    return load_recipe(REPO / "recipes" / "demo.toml", [
        f"output.root='{tmp / 'runs'}'", "mission.name='mosaic'", f"data.root='{tmp / 'data'}'",
        "data.format='synthetic'", "data.train='ImageSets/Main/train.txt'", "data.val='ImageSets/Main/val.txt'",
        "data.class_names=['circle', 'square', 'triangle']", "data.synthetic.num_train=8",
        "data.synthetic.num_val=2", "data.synthetic.img_size=64", "data.batch_size=2", "data.num_workers=0",
        "model.img_dim=64", *extra,
    ])  # fmt: skip


def _images(ds: DetectionDataset, workers: int) -> torch.Tensor:
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_fn)
    return torch.cat([images for images, _ in loader])


def test_same_seed_epoch_index_same_mosaic_whatever_the_workers(tmp_path: Path) -> None:
    ds = build_dataset(_recipe(tmp_path, "data.augments=['mosaic']"), "train")
    plain = build_dataset(_recipe(tmp_path, "data.augments=[]"), "train")
    assert isinstance(ds, DetectionDataset) and isinstance(ds.transforms, Mosaic)
    ds.set_epoch(3)
    zero, two = _images(ds, 0), _images(ds, 2)
    assert zero.shape == (8, 3, 64, 64) and torch.equal(zero, two)
    assert not torch.equal(zero, _images(plain, 0))  # it did mosaic
    ds.set_epoch(4)
    other = _images(ds, 0)
    assert all(not torch.equal(a, b) for a, b in zip(zero, other, strict=True))  # another epoch, another draw
    # a partner that fails to load is replaced by the sample itself ("skip"), or stops it ("error")
    ds.records[1].path = tmp_path / "missing.png"
    ds.set_epoch(3)
    for i in range(len(ds)):
        if i != 1:
            ds[i]  # loads whatever partners it draws
    ds.on_bad_sample = "error"
    raised = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in (0, *range(2, len(ds))):
            try:
                ds[i]
            except DatasetError as exc:
                assert "missing.png" in str(exc)
                raised += 1
    assert raised  # some sample drew it as a partner (about a third of them per epoch)


def test_a_stage_without_mosaic_gives_plain_samples_and_validation_never_mosaics(tmp_path: Path) -> None:
    stages = "data.stages=[{epochs=2, augments=['mosaic']}, {epochs=1, augments=[]}]"
    ds = build_dataset(_recipe(tmp_path, stages), "train")
    plain = build_dataset(_recipe(tmp_path, "data.augments=[]"), "train")
    assert isinstance(ds, DetectionDataset) and isinstance(ds.transforms, StagedTransforms)
    for epoch, mosaic in ((1, True), (2, False), (5, False)):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(4):
            (image, target), (ref, ref_target) = ds[i], plain[i]
            assert torch.equal(image, ref) is not mosaic
            assert torch.equal(target["boxes"], ref_target["boxes"]) is not mosaic
    val = build_dataset(_recipe(tmp_path, "data.augments=['mosaic']"), "val")
    ref_val = build_dataset(_recipe(tmp_path, "data.augments=[]"), "val")
    assert not isinstance(val.transforms, Mosaic)
    for i in range(len(val)):
        assert torch.equal(val[i][0], ref_val[i][0])


class _Count(Hook):
    def __init__(self, calls: list[int]) -> None:
        self.calls, self.per_epoch = calls, []

    def after_epoch(self, state: TrainState) -> None:
        self.per_epoch.append(len(self.calls))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_recipe_trains_with_mosaic_then_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_det.engine.trainer import run_training

    calls: list[int] = []
    apply = Mosaic.apply

    def counted(self: Mosaic, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(Mosaic, "apply", counted)
    recipe = _recipe(
        tmp_path, "data.stages=[{epochs=1, augments=['mosaic', 'hflip']}, {epochs=1, augments=['hflip']}]",
        "train.max_epoch=2", "scheduler.milestones=[]", "scheduler.warmup_iters=1", "log.trackers=[]",
        "eval.freq=2", "data.synthetic.num_train=4", "model.img_dim=128",
    )
    hook = _Count(calls)
    state = run_training(recipe, [hook])
    assert state is not None and state.epoch == 2
    assert hook.per_epoch == [4, 4]  # every sample of the first epoch mosaicked, none of the second


def test_with_a_mix_each_set_draws_partners_from_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_det.data.mix import MixedDataset

    ds = build_dataset(_recipe(tmp_path, "data.augments=['mosaic']", "data.mix.rate=0.5",
                               "data.synthetic.num_val=3"), "train")  # fmt: skip
    assert isinstance(ds, MixedDataset)
    seen: dict[str, list[int]] = {"first": [], "second": []}
    for name, part in (("first", ds.first), ("second", ds.second)):
        load = part._partner

        def spy(idx: int, name: str = name, load: Any = load) -> Any:
            seen[name].append(idx)
            return load(idx)

        monkeypatch.setattr(part, "_partner", spy)
    n1 = len(ds.first)
    for i in range(n1, len(ds)):  # the second set's samples
        ds[i]
    assert not seen["first"] and len(seen["second"]) == 3 * len(ds.second)
    assert all(0 <= j < len(ds.second) for j in seen["second"])
