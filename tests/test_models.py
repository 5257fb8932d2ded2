"""Registry completeness, every registered model forward+backward at small size, and local weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from accel_det.config import KNOWN_MODELS, load_recipe
from accel_det.models import MODELS, WeightsError, build_model, load_weights
from accel_det.registry import RegistryError


def test_registry_matches_config() -> None:
    assert sorted(KNOWN_MODELS) == MODELS.names()


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(RegistryError, match=r"unknown model 'fasterrcnn'.*known: faceboxes"):
        MODELS.get("fasterrcnn")


def _batch(n: int, size: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
    ][:n]
    return images, targets


@pytest.mark.parametrize("name", [m for m in KNOWN_MODELS if m.startswith("tv_")])
def test_torchvision_model_forward_backward(name: str) -> None:
    size = 128
    recipe = load_recipe(None, [f"model.name='{name}'", f"model.img_dim={size}", "eval.max_det=7"])
    torch.manual_seed(0)
    model, report = build_model(recipe)
    assert report is None
    images, targets = _batch(2, size)
    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.inference_mode():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert set(det) >= {"boxes", "scores", "labels"}
        assert len(det["boxes"]) <= 7
        if len(det["boxes"]):
            assert det["boxes"].min() >= 0 and det["boxes"].max() <= size
            assert det["labels"].min() >= 1 and det["labels"].max() <= recipe.num_classes


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
    body = {k.removeprefix("backbone.body."): v.clone() + 1 for k, v in model.state_dict().items()
            if k.startswith("backbone.body.") and v.is_floating_point()}
    path = tmp_path / "backbone.safetensors"
    save_file(body, str(path))
    report = load_weights(model, path)
    assert report.prefix == "backbone.body."
    assert len(report.loaded) == len(body)


def test_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    recipe = load_recipe(None, ["model.name='faceboxes'", "model.img_dim=128"])
    model, _ = build_model(recipe)
    with pytest.raises(WeightsError, match="bad.safetensors: cannot read weights"):
        load_weights(model, path)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(model, tmp_path / "missing.pth")
