"""model.backbone = "timm:<name>": native heads on timm feature extractors (models/timm_backbone.py).

Small nets at 64-128 px: resnet10t (timm's generic FeatureListNet: recompute stages) and
mobilenetv3_small_050 (timm's own MobileNetV3Features class). Nothing may touch the network.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from accel_det import catalog  # noqa: E402
from accel_det.catalog import TIMM_BACKBONES, TimmBackboneInfo, feature_strides, head_taps  # noqa: E402
from accel_det.config import RecipeError  # noqa: E402
from accel_det.config_io import load_recipe  # noqa: E402
from accel_det.models import MODELS, WeightsError, build_model  # noqa: E402
from accel_det.models.timm_backbone import TimmBackbone  # noqa: E402

REPO = Path(__file__).parents[1]
RESNET, MNV3 = "timm:resnet10t", "timm:mobilenetv3_small_050"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both nets' pretrained config


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm builds without weights and never downloads: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def recipe(name: str, backbone: str, *overrides: str, img_dim: int = 64):
    return load_recipe(None, [f"model.name='{name}'", f"model.backbone='{backbone}'", f"model.img_dim={img_dim}",
                              "data.class_names=['a', 'b']", "eval.conf_thres=0.0", "eval.max_det=5", *overrides])


def build(name: str, backbone: str, *overrides: str, img_dim: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(recipe(name, backbone, *overrides, img_dim=img_dim))
    return model


def targets(size: int = 64) -> list[dict[str, torch.Tensor]]:
    s = size / 64
    return [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]) * s, "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


# ------------------------------------------------------------------------------------- build and forward


@pytest.mark.parametrize(
    ("name", "backbone"),
    [("ssdlite_mobilenet_v3", MNV3), ("ssdlite_resnet18", RESNET), ("faceboxes", MNV3), ("faceboxes", RESNET)],
)
def test_build_forward_strides_and_channels(name: str, backbone: str) -> None:
    size = 128 if name == "faceboxes" else 64  # FaceBoxes' maps: 4x4, 2x2, 1x1
    model = build(name, backbone, img_dim=size)
    info = timm.create_model(backbone[5:], features_only=True, pretrained=False).feature_info
    taps = head_taps(name, info.reduction())
    bb = model.net.backbone
    assert isinstance(bb, TimmBackbone) and bb.taps == taps
    assert bb.strides == [info.reduction()[i] for i in taps] and bb.out_channels == [info.channels()[i] for i in taps]
    # the net's strides (timm's + the head's extra layers) are what validation derived and the anchors use
    assert list(model.net.strides) == list(feature_strides(name, backbone))
    assert list(model.net.strides) == recipe(name, backbone, img_dim=size).model.anchors.steps
    x = torch.rand(2, 3, size, size)
    feats = bb(x)
    assert [f.shape[1] for f in feats] == bb.out_channels
    assert [f.shape[-1] for f in feats] == [-(-size // s) for s in bb.strides]
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))

    model.train()
    losses = model(x, targets(size))
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]  # DDP (find_unused_parameters=False) refuses them
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, size, size))
    assert len(out) == 1 and out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) > 0



def test_ssdlite_adds_extra_blocks_up_to_four_maps() -> None:
    """convnext has no stride-2 level (4/8/16/32): the same three taps; a backbone whose deepest level is 16
    gets three extra blocks (strides 32, 64, 128)."""
    assert feature_strides("ssdlite_resnet18", "timm:convnext_atto") == (8, 16, 32, 64)
    assert head_taps("ssdlite_resnet18", (4, 8, 16, 32)) == [1, 2, 3]
    assert head_taps("ssdlite_resnet18", (16, 16, 16)) == [2]  # the last level of a stride
    assert head_taps("faceboxes", (2, 4, 8, 16, 32)) == [4]
    with pytest.raises(ValueError, match="stride-32 level"):
        head_taps("faceboxes", (4, 8, 16))
    with pytest.raises(ValueError, match="stride >= 8"):
        head_taps("ssdlite_resnet18", (2, 4))


def test_own_stage_loop_equals_timm_forward() -> None:
    """On FeatureListNet accel_det runs the modules itself (for recompute): the same maps as timm's forward."""
    bb = TimmBackbone(RESNET, "ssdlite_resnet18").eval()
    assert bb.stage_names == ("act1", "layer1", "layer2", "layer3", "layer4") and len(bb.stages) == 5
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = bb(x), bb.body(x)
    for a, i in zip(ours, bb.taps, strict=True):
        torch.testing.assert_close(a, theirs[i], rtol=0, atol=0)
    assert TimmBackbone(MNV3, "faceboxes").stages == []  # MobileNetV3Features: one call


def test_catalog_table_matches_timm() -> None:
    """The torch-free table validation reads is what timm reports (built on the meta device: no memory)."""
    from timm.models import FeatureDictNet

    for name, info in TIMM_BACKBONES.items():
        with torch.device("meta"):
            body = timm.create_model(name, features_only=True, pretrained=False)
        assert tuple(body.feature_info.reduction()) == info.reductions, name
        assert isinstance(body, FeatureDictNet) == info.stages, name
    for _, backbone in catalog.TIMM_EXAMPLES:
        assert timm.is_model(backbone.removeprefix("timm:"))


def test_map_rounded_down_is_an_error_naming_img_dim() -> None:
    """convnext's 4x4 stride-4 stem rounds down: at 130 px its stride-8 map is 16x16, the priors' 17x17."""
    model = build("ssdlite_resnet18", "timm:convnext_atto", img_dim=130).eval()
    with pytest.raises(RecipeError, match=r"^model.backbone: timm:convnext_atto gives a 16x16 map at stride 8 for a "
                       r"130x130 input where the priors expect 17x17: use a model.img_dim that is a multiple of 32$"):
        model(torch.rand(1, 3, 130, 130))
    model(torch.rand(1, 3, 128, 128))


# ------------------------------------------------------------------------------------------------ weights


def _classifier_state(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()  # the full classifier, as on the hub


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_backbone_weights_file(tmp_path: Path, fmt: str) -> None:
    sd = _classifier_state("resnet10t")
    path = tmp_path / f"resnet10t.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    # loaded after model.init: xavier must not overwrite the file's tensors
    r = recipe("ssdlite_resnet18", RESNET, f"model.backbone_weights='{path}'", "model.init='xavier'")
    model, report = build_model(r)
    body = model.net.backbone.body.state_dict()
    for k, v in body.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    assert report is not None and report.prefix == "net.backbone.body."
    assert len(report.loaded) == len(body) and not report.missing
    assert {"fc.weight", "fc.bias"} <= set(report.unexpected)  # the classifier's head
    # model.weights (loaded last) wins over the backbone file
    full = tmp_path / "full.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}, str(full))
    model2, report2 = build_model(r.model_copy(update={"model": r.model.model_copy(update={"weights": str(full)})}))
    assert report2 is not None and report2.path == str(full)
    assert all(v.abs().sum() == 0 for k, v in model2.state_dict().items() if v.is_floating_point())


def test_backbone_weights_flattened_names_and_other_channels(tmp_path: Path) -> None:
    """timm's flatten_sequential feature nets rename "blocks.1.x" to "blocks_1.x"; a 1-channel backbone gets the
    3-channel stem adapted (as timm's own pretrained loading does)."""
    sd = _classifier_state("ghostnet_100")
    path = tmp_path / "ghostnet.safetensors"
    save_file(sd, str(path))
    model, report = build_model(recipe("ssdlite_resnet18", "timm:ghostnet_100", f"model.backbone_weights='{path}'",
                                       "model.channels=1"))
    body = model.net.backbone.body
    assert any("_" in k.split(".")[0] for k in body.state_dict())  # names really are flattened here
    assert report is not None and not report.missing
    stem = body.state_dict()["conv_stem.weight"]
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, sd["conv_stem.weight"].sum(dim=1, keepdim=True))


def test_bad_backbone_weights_files(tmp_path: Path) -> None:
    def fails(path: Path, match: str) -> str:
        with pytest.raises(WeightsError) as info:
            build_model(recipe("ssdlite_resnet18", RESNET, f"model.backbone_weights='{path}'"))
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"model.backbone_weights: {path}") and match in msg, msg
        return msg

    fails(tmp_path / "nope.pth", "weights file not found")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    fails(garbage, "not a readable torch/safetensors weights file")
    other = tmp_path / "mnv3.safetensors"
    save_file(_classifier_state("mobilenetv3_small_050"), str(other))
    fails(other, "does not fit timm:resnet10t (4 of another shape, e.g. bn1.")  # bn1.* are in both nets
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"head.fc.weight": torch.zeros(3, 4)}, str(unrelated))
    fails(unrelated, "no tensor matches timm:resnet10t (1 in the file, e.g. 'head.fc.weight'; the backbone's are like")
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in _classifier_state("resnet10t").items() if not k.startswith("layer4")}, str(partial))
    fails(partial, "does not fit timm:resnet10t (")
    wrong = tmp_path / "resnet18.safetensors"  # the same names, other shapes
    save_file(_classifier_state("resnet18"), str(wrong))
    fails(wrong, "of another shape, e.g. ")


# ------------------------------------------------------------------------------------ recompute, sync_bn


def test_recompute_on_a_feature_list_net() -> None:
    """Every stage of a FeatureListNet recomputed: the same loss, gradients and BatchNorm statistics."""
    results = []
    for n in (0, 5):
        model = build("ssdlite_resnet18", RESNET, f"model.recompute={n}").train()
        assert model.net.backbone.recompute == n
        calls = [0]
        for m in model.net.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        torch.manual_seed(1)
        losses = model(torch.rand(2, 3, 64, 64), targets())
        sum(losses.values()).backward()
        results.append((losses, {k: p.grad for k, p in model.named_parameters()}, model.state_dict(), calls[0]))
    (l0, g0, s0, c0), (l1, g1, s1, c1) = results
    assert c1 > c0
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-6, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-6, atol=1e-6, msg=k)


def test_recompute_refused_where_timm_has_no_stages() -> None:
    with pytest.raises(RecipeError, match="model.recompute: timm:mobilenetv3_small_050 runs as one call"):
        recipe("ssdlite_mobilenet_v3", MNV3, "model.recompute=1")
    with pytest.raises(RecipeError, match="model.recompute: 6 but faceboxes on timm:resnet10t has 5 backbone stages"):
        recipe("faceboxes", RESNET, "model.recompute=6")
    # a name outside the catalog's table: the built model says it
    r = recipe("ssdlite_mobilenet_v3", "timm:mobilenetv3_small_075", "model.recompute=1")
    with pytest.raises(RecipeError, match=r"^model.recompute: 1 but ssdlite_mobilenet_v3 on "
                       r"timm:mobilenetv3_small_075 has no recomputable stages$"):
        MODELS.get(r.model.name)(r)


def test_sync_bn_keeps_timm_activations() -> None:
    """timm's BatchNormAct2d holds its activation; torch's converter would drop it and change the outputs."""
    from accel_det.models.sync_bn import convert_sync_bn

    model = build("ssdlite_mobilenet_v3", MNV3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model.net(x)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced, note = convert_sync_bn(model, 2, "cuda")  # converting needs no process group, nor a GPU
    assert note == f"model.sync_bn: {n_bn} BatchNorm layers -> SyncBatchNorm over 2 processes"
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    with torch.no_grad():
        after = synced.eval().net(x)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- validation, no timm


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.backbone='resnet18'"], "model.backbone: 'resnet18' must be '' or 'timm:<timm model name>'"),
        (["model.backbone='timm:hf-hub:timm/resnet18'"], "must be '' or 'timm:<timm model name>'"),
        (["model.backbone='timm:../weights'"], "must be '' or 'timm:<timm model name>'"),
        (["model.name='tv_fcos_resnet50_fpn'", "model.backbone='timm:resnet18'"],
         "model.backbone: applies only to native models"),
        (["model.backbone_weights='w.pth'"], "model.backbone_weights: needs model.backbone"),
        (["model.backbone='timm:resnet18'", "model.anchors.steps=[8, 16, 32]"],
         "model.anchors.steps: ssdlite_mobilenet_v3 on timm:resnet18 has 4 feature maps (strides [8, 16, 32, 64]) "
         "but steps lists 3"),
        (["model.backbone='timm:resnet18'", "model.anchors.steps=[16, 32, 64, 128]"],
         "model.anchors.steps: must be [8, 16, 32, 64]: ssdlite_mobilenet_v3 on timm:resnet18 predicts on 4"),
        (["model.backbone='timm:resnet18'", "model.recompute=6"], "model.recompute: 6 but ssdlite_mobilenet_v3 on "),
    ],
)
def test_validation_errors(tmp_path: Path, overrides: list[str], expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)


def test_validation_follows_the_tables_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TIMM_BACKBONES, "fake16", TimmBackboneInfo((4, 8, 16), True))
    r = load_recipe(None, ["model.backbone='timm:fake16'", "model.img_dim=128"])
    assert r.model.anchors is not None and r.model.anchors.steps == [8, 16, 32, 64]
    monkeypatch.setitem(TIMM_BACKBONES, "fake16", TimmBackboneInfo((16, 16), True))
    r = load_recipe(None, ["model.backbone='timm:fake16.some_tag'", "model.img_dim=128"])
    assert r.model.anchors is not None and r.model.anchors.steps == [16, 32, 64, 128]
    with pytest.raises(RecipeError, match=r"model.backbone: timm:fake16: FaceBoxes' heads need a stride-32 level; "
                       r"the backbone's are \[16, 16\]"):
        load_recipe(None, ["model.name='faceboxes'", "model.backbone='timm:fake16'"])


def test_strides_of_a_name_outside_the_table_are_checked_when_built() -> None:
    if not timm.is_model("test_vit"):
        pytest.skip("timm without its test_vit model")
    r = load_recipe(None, ["model.backbone='timm:test_vit'", "model.img_dim=128"])  # assumed: 8/16/32 + 64
    with pytest.raises(RecipeError, match=r"^model.anchors.steps: \[8, 16, 32, 64\] but ssdlite_mobilenet_v3 on "
                       r"timm:test_vit has feature strides \[16, 32, 64, 128\]: set \[model.anchors\] steps"):
        MODELS.get(r.model.name)(r)
    r = load_recipe(None, ["model.backbone='timm:test_vit'", "model.img_dim=128",
                           "model.anchors.steps=[16, 32, 64, 128]"])
    assert MODELS.get(r.model.name)(r).net.strides == [16, 32, 64, 128]
    r = load_recipe(None, ["model.name='faceboxes'", "model.backbone='timm:test_vit'"])
    with pytest.raises(RecipeError, match=r"^model.backbone: timm:test_vit: FaceBoxes' heads need a stride-32 level"):
        MODELS.get(r.model.name)(r)


def test_unknown_timm_name_at_build() -> None:
    r = load_recipe(None, ["model.backbone='timm:resnet18x'"])  # validation cannot list timm's names without torch
    with pytest.raises(RecipeError, match=r"^model.backbone: 'timm:resnet18x' is not a timm model \(did you mean "
                       r"'timm:resnet18'\?\)$"):
        MODELS.get(r.model.name)(r)


def test_without_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    r = recipe("ssdlite_resnet18", RESNET)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError; find_spec -> None
    with pytest.raises(RecipeError, match=r": model.backbone: 'timm:resnet10t' needs the timm package: pip install "
                       r"accel-det\[timm\]$"):
        recipe("ssdlite_resnet18", RESNET)
    with pytest.raises(RecipeError, match=r"^model.backbone: 'timm:resnet10t' needs the timm package: pip install "
                       r"accel-det\[timm\]$"):
        MODELS.get(r.model.name)(r)  # a recipe validated elsewhere (recipe.json)
    build("ssdlite_resnet18", "")  # the native models need no timm


def test_validate_imports_neither_torch_nor_timm() -> None:
    code = ("import sys; from accel_det.config_io import load_recipe; "
            "load_recipe('recipes/demo_timm.toml', ['model.backbone=\"timm:resnet18\"', 'model.recompute=2']); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    code = ("import sys; sys.modules['timm'] = None; import accel_det.models, accel_det.train, accel_det.predict; "
            "from accel_det.config_io import load_recipe; from accel_det.models import build_model; "
            "build_model(load_recipe('recipes/demo.toml', ['model.img_dim=64']))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
