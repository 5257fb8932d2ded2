"""Registry completeness, every registered model through one training step and eval, and local weight loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import detection as tvd

from accel_det.config import KNOWN_MODELS
from accel_det.config_io import load_recipe
from accel_det.models import MODELS, WeightsError, build_model, load_weights
from accel_det.models.torchvision_zoo import LabelsFromOne
from accel_det.registry import RegistryError


def test_registry_matches_config() -> None:
    assert sorted(KNOWN_MODELS) == MODELS.names()


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(RegistryError, match=r"unknown model 'fasterrcnn'.*known: afdet_mobilenet_v3, faceboxes"):
        MODELS.get("fasterrcnn")


# ------------------------------------------------------------------------------------------- every model

TINY_DIM = 64  # every registered model trains at 64 with a batch of 2 (the SSD300/SSDlite320 resize anyway)
TINY_CLASSES = 2
TINY_MAX_DET = 5


def _targets(size: int) -> list[dict[str, torch.Tensor]]:
    s = size / 64
    return [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]) * s, "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
    ]


@pytest.mark.parametrize("name", MODELS.names())  # a newly registered model is covered without editing this
def test_every_model_trains_one_step_and_detects(name: str) -> None:
    recipe = load_recipe(
        None,
        [
            f"model.name='{name}'",
            f"model.img_dim={TINY_DIM}",
            "model.channels=3",
            f"data.class_names={[f'c{i}' for i in range(TINY_CLASSES)]}",
            "eval.conf_thres=0.0",
            f"eval.max_det={TINY_MAX_DET}",
        ],
    )
    torch.manual_seed(0)
    model, report = build_model(recipe)
    assert report is None

    # one training step; the targets are the data loader's batch and must come back unchanged
    targets = _targets(TINY_DIM)
    before = [{k: v.clone() for k, v in t.items()} for t in targets]
    model.train()
    losses = model(torch.rand(2, 3, TINY_DIM, TINY_DIM), targets)
    assert isinstance(losses, dict) and losses
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for t, b in zip(targets, before, strict=True):
        assert all(torch.equal(t[k], b[k]) for k in b), "the model modified the targets in place"
    # DDP (find_unused_parameters=False) fails on a trainable parameter that gets no gradient
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]
    params = [p for p in model.parameters() if p.grad is not None]
    old = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.01).step()
    assert any(not torch.equal(p, o) for p, o in zip(params, old, strict=True)), "the SGD step changed nothing"

    # eval with conf_thres 0: every image gets detections, so the checks below cannot pass vacuously;
    # H != W so a swapped width/height in the clamping shows up
    h, w = TINY_DIM, TINY_DIM * 3 // 4
    images = torch.rand(2, 3, h, w)
    images[1, :, 8:40, 4:30] = 1.0  # the second image is not just noise
    model.eval()
    with torch.inference_mode():
        out = model(images)
    assert isinstance(out, list) and len(out) == 2
    for det in out:
        assert set(det) >= {"boxes", "scores", "labels"}
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        n = len(boxes)
        assert 0 < n <= TINY_MAX_DET
        assert boxes.shape == (n, 4) and scores.shape == (n,) and labels.shape == (n,)
        assert labels.dtype == torch.int64 and scores.is_floating_point()
        assert ((labels >= 1) & (labels <= TINY_CLASSES)).all(), labels  # 0 is background, never a detection
        assert ((scores >= 0) & (scores <= 1)).all(), scores
        x1, y1, x2, y2 = boxes.unbind(1)
        assert torch.isfinite(boxes).all()
        assert ((x1 >= 0) & (x1 <= x2) & (x2 <= w)).all(), boxes
        assert ((y1 >= 0) & (y1 <= y2) & (y2 <= h)).all(), boxes


def test_sigmoid_heads_shift_labels_at_the_boundary() -> None:
    """torchvision's sigmoid heads have K outputs, class c at output c - 1: shift in and out, copy the targets."""
    seen: list[list[dict[str, torch.Tensor]] | None] = []

    class Fake(nn.Module):
        def forward(self, images, targets=None):  # noqa: ANN001, ANN202  (torchvision's untyped signature)
            seen.append(targets)
            if self.training:
                return {"loss": torch.zeros(())}
            return [{"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([0, 1])}]

    class Shifted(LabelsFromOne, Fake):
        pass

    model = Shifted()
    targets = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 2])}]
    model.train()(torch.zeros(1, 3, 8, 8), targets)
    assert seen[-1] is not None and seen[-1][0]["labels"].tolist() == [0, 1]
    assert targets[0]["labels"].tolist() == [1, 2]  # the caller's targets untouched
    out = model.eval()(torch.zeros(1, 3, 8, 8))
    assert out[0]["labels"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("name", "tv_builder"),
    [("tv_retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2), ("tv_fcos_resnet50_fpn", tvd.fcos_resnet50_fpn)],
)
def test_sigmoid_head_models_have_k_outputs_and_torchvision_keys(name: str, tv_builder) -> None:  # noqa: ANN001
    recipe = load_recipe(None, [f"model.name='{name}'", "model.img_dim=64", "data.class_names=['a', 'b']"])
    model, _ = build_model(recipe)
    assert isinstance(model, LabelsFromOne)
    assert model.head.classification_head.num_classes == 2  # no logit for a background that never occurs
    # the same keys and shapes as torchvision's own model: its checkpoints keep loading
    ref = tv_builder(weights=None, weights_backbone=None, num_classes=2)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# ----------------------------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def faceboxes() -> nn.Module:
    return build_model(load_recipe(None, ["model.name='faceboxes'", "model.img_dim=128"]))[0]


def test_weights_strip_prefixes_and_skip_mismatched_head(tmp_path: Path) -> None:
    r3 = load_recipe(None, ["model.name='faceboxes'", "model.img_dim=128"])
    src, _ = build_model(r3)
    # a DDP + torch.compile wrapped checkpoint of a 3-class model, loaded into a 1-class model
    sd = {f"module._orig_mod.{k}": v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    r1 = load_recipe(None, ["model.name='faceboxes'", "model.img_dim=128", "data.class_names=['face']"])
    dst, _ = build_model(r1)
    report = load_weights(dst, path)
    assert report.skipped, "the class head has another shape and must be skipped"
    assert not report.unexpected
    dst_sd = dst.state_dict()
    for k in report.loaded:
        assert torch.equal(dst_sd[k], src.state_dict()[k])
    assert all(k.split(":")[0] in report.missing for k in report.skipped)


def test_backbone_only_weights_found_under_prefix(tmp_path: Path) -> None:
    recipe = load_recipe(None, ["model.name='tv_fasterrcnn_mobilenet_v3_large_320_fpn'", "model.img_dim=128"])
    model, _ = build_model(recipe)
    body = {
        k.removeprefix("backbone.body."): v.clone() + 1
        for k, v in model.state_dict().items()
        if k.startswith("backbone.body.") and v.is_floating_point()
    }
    path = tmp_path / "backbone.safetensors"
    save_file(body, str(path))
    report = load_weights(model, path)
    assert report.prefix == "backbone.body."
    assert len(report.loaded) == len(body)


def test_weights_format_follows_content_not_suffix(tmp_path: Path, faceboxes: nn.Module) -> None:
    sd = {k: v + 1 for k, v in faceboxes.state_dict().items() if v.is_floating_point()}
    save_file(sd, str(tmp_path / "st.pth"))  # safetensors named .pth
    torch.save(sd, tmp_path / "pt.safetensors")  # a torch zip named .safetensors
    for name in ("st.pth", "pt.safetensors"):
        assert len(load_weights(faceboxes, tmp_path / name).loaded) == len(sd)


def _garbage_files(tmp_path: Path) -> dict[str, str]:
    """file name -> what its one-line error must say."""
    g = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    (tmp_path / "x.pth").write_bytes(noise)
    (tmp_path / "notes.pth").write_text("these are not weights\nsecond line\n")
    (tmp_path / "x.safetensors").write_bytes(noise)
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    # a real checkpoint that also pickles a Python object: weights_only loading refuses it
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pth")
    unreadable = "not a readable torch/safetensors weights file"
    return {
        "x.pth": unreadable,
        "notes.pth": unreadable,
        "x.safetensors": unreadable,
        "trunc.safetensors": unreadable,
        "trunc.pth": unreadable,
        "empty.pth": "empty file",
        "empty.safetensors": "empty file",
        "args.pth": "argparse.Namespace",
    }


def test_unreadable_weights_are_one_line_naming_the_file(
    tmp_path: Path, faceboxes: nn.Module, recwarn: pytest.WarningsRecorder
) -> None:
    for name, says in _garbage_files(tmp_path).items():
        with pytest.raises(WeightsError) as err:
            load_weights(faceboxes, tmp_path / name)
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / name}: ") and says in msg, msg
        assert "\n" not in msg and len(msg) < 400, msg  # not torch's paragraph of weights_only advice
        assert "weights_only" not in msg, msg
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    with pytest.raises(WeightsError, match="missing.pth: weights file not found"):
        load_weights(faceboxes, tmp_path / "missing.pth")


def test_weights_of_another_model_are_one_line(tmp_path: Path, faceboxes: nn.Module) -> None:
    save_file({"some.other.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_weights(faceboxes, tmp_path / "other.safetensors")
    msg = str(err.value)
    assert "other.safetensors: no tensor matches the model" in msg and "some.other.weight" in msg
    assert "\n" not in msg
    torch.save({"model": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="list.pth: not a state dict of tensors"):
        load_weights(faceboxes, tmp_path / "list.pth")
