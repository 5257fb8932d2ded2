"""Native anchor models: priors, box coding, MultiBox loss, AnchorDetector, init.

Every registered model (native or not) through a training step and eval: test_models.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import product

import pytest
import torch
from torchvision.ops import box_iou

import accel_det.models.faceboxes  # noqa: F401  (registration)
import accel_det.models.ssd  # noqa: F401
from accel_det.config import AnchorConfig, RecipeError
from accel_det.config_io import load_recipe
from accel_det.losses.multibox import MultiBoxLoss, match
from accel_det.models.base import MODELS
from accel_det.models.init import background_bias, init_conf_bias, init_weights
from accel_det.models.priors import PriorBox
from accel_det.models.ssd import MobileNetV3Taps, default_ssd_anchors
from accel_det.ops.boxes import cxcywh_to_xyxy, decode, encode


def recipe(*overrides: str):
    return load_recipe(None, ["model.img_dim=128", *overrides])


def build(name: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.get(name)(recipe(f"model.name='{name}'", *overrides))


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [60.0, 64.0, 120.0, 110.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def reference_faceboxes_priors(h: int, w: int) -> torch.Tensor:
    """FaceBoxes.PyTorch's layers/functions/prior_box.py, loop for loop."""
    min_sizes, steps = [[32, 64, 128], [256], [512]], [32, 64, 128]
    anchors: list[float] = []
    for k, step in enumerate(steps):
        for i, j in product(range(math.ceil(h / step)), range(math.ceil(w / step))):
            for ms in min_sizes[k]:
                s_kx, s_ky = ms / w, ms / h
                if ms in (32, 64):
                    offs = [0, 0.25, 0.5, 0.75] if ms == 32 else [0, 0.5]
                    dcx = [(j + o) * step / w for o in offs]
                    dcy = [(i + o) * step / h for o in offs]
                    for cy, cx in product(dcy, dcx):
                        anchors += [cx, cy, s_kx, s_ky]
                else:
                    anchors += [(j + 0.5) * step / w, (i + 0.5) * step / h, s_kx, s_ky]
    return torch.tensor(anchors).view(-1, 4)


# ------------------------------------------------------------------------------------------------ priors


def test_faceboxes_priors_match_reference() -> None:
    pb = PriorBox(AnchorConfig())
    assert pb.num_anchors() == [21, 1, 1]
    p = pb(1024, 1024)
    assert p.shape == (21824, 4)  # 32*32*21 + 16*16 + 8*8, as FaceBoxes.PyTorch at 1024
    s = 1 / 1024
    torch.testing.assert_close(p[0], torch.tensor([0.0, 0.0, 32 * s, 32 * s]))
    torch.testing.assert_close(p[1], torch.tensor([8 * s, 0.0, 32 * s, 32 * s]))  # dense 32s: step/4
    torch.testing.assert_close(p[4], torch.tensor([0.0, 8 * s, 32 * s, 32 * s]))  # cy outer, cx inner
    torch.testing.assert_close(p[16], torch.tensor([0.0, 0.0, 64 * s, 64 * s]))
    torch.testing.assert_close(p[17], torch.tensor([16 * s, 0.0, 64 * s, 64 * s]))
    torch.testing.assert_close(p[20], torch.tensor([16 * s, 16 * s, 128 * s, 128 * s]))
    torch.testing.assert_close(p[21], torch.tensor([32 * s, 0.0, 32 * s, 32 * s]))  # next cell
    torch.testing.assert_close(p[-1], torch.tensor([(7.5 * 128) * s, (7.5 * 128) * s, 512 * s, 512 * s]))
    # non-square input, every prior equal to the reference loop
    torch.testing.assert_close(pb(320, 448), reference_faceboxes_priors(320, 448))


def test_priors_aspect_ratios_clip_and_cache() -> None:
    cfg = AnchorConfig(min_sizes=[[16], [48, 64]], steps=[8, 16], aspect_ratios=[[2], [2, 3]], densify=False)
    pb = PriorBox(cfg)
    assert pb.num_anchors() == [3, 10]
    p = pb(64, 64)
    assert p.shape == (8 * 8 * 3 + 4 * 4 * 10, 4)
    torch.testing.assert_close(p[1, 2:] * 64, torch.tensor([16 * math.sqrt(2), 16 / math.sqrt(2)]))
    torch.testing.assert_close(p[2, 2:] * 64, torch.tensor([16 / math.sqrt(2), 16 * math.sqrt(2)]))
    assert pb(64, 64) is p  # cached: no rebuild (and no host->device copy) per step
    clipped = cxcywh_to_xyxy(PriorBox(cfg.model_copy(update={"clip": True}))(64, 64))
    assert clipped.min() >= 0 and clipped.max() <= 1 + 1e-6
    assert cxcywh_to_xyxy(p).min() < 0  # border priors stick out without clip


def test_ssd_default_anchors_scale_with_img_dim() -> None:
    a128, a160 = default_ssd_anchors(128), default_ssd_anchors(160)
    assert a128.steps == [8, 16, 32, 64] and not a128.densify
    assert a160.min_sizes[0][0] == pytest.approx(a128.min_sizes[0][0] * 160 / 128, abs=0.1)
    assert PriorBox(a128).num_anchors() == [6, 6, 6, 6]


# ------------------------------------------------------------------------------------------- box coding


def test_encode_decode_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    priors = torch.cat([torch.rand(500, 2, generator=g), torch.rand(500, 2, generator=g) * 0.5 + 0.02], 1)
    xy = torch.rand(500, 2, generator=g) * 0.8
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 0.3 + 0.01], 1)
    for var in ((0.1, 0.2), (1.0, 1.0)):
        torch.testing.assert_close(decode(encode(boxes, priors, var), priors, var), boxes, atol=1e-5, rtol=0)
    # a box equal to its prior encodes to zeros
    torch.testing.assert_close(
        encode(cxcywh_to_xyxy(priors), priors, (0.1, 0.2)), torch.zeros(500, 4), atol=1e-4, rtol=0
    )


# ------------------------------------------------------------------------------------------- matching


def test_match_forces_best_prior_for_every_gt() -> None:
    priors = PriorBox(AnchorConfig())(128, 128)  # FaceBoxes priors: nothing smaller than 32 px
    tiny = torch.tensor([[0.50, 0.50, 0.53, 0.52]])  # ~4 px: best IoU far below any threshold
    big = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    boxes = [torch.cat([tiny, big]), torch.zeros(0, 4)]
    labels = [torch.tensor([2, 1]), torch.zeros(0, dtype=torch.int64)]
    best_tiny = box_iou(tiny, cxcywh_to_xyxy(priors)).argmax()
    assert box_iou(tiny, cxcywh_to_xyxy(priors)).max() < 0.1
    matched, conf_t = match(boxes, labels, priors, iou_thres=0.35)
    assert conf_t[0, best_tiny] == 2
    torch.testing.assert_close(matched[0, best_tiny], tiny[0])
    assert (conf_t[0] == 1).sum() >= 1 and (conf_t[0] == 2).sum() == 1
    assert (conf_t[1] == 0).all()  # the empty image: all background


def test_match_equals_per_image_reference() -> None:
    """The batched match equals ssd.pytorch's per-image loop on random boxes."""
    g = torch.Generator().manual_seed(1)
    priors = PriorBox(default_ssd_anchors(128))(128, 128)
    boxes, labels = [], []
    for n in (3, 0, 7, 1):
        xy = torch.rand(n, 2, generator=g) * 0.7
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.3 + 0.02], 1))
        labels.append(torch.randint(1, 4, (n,), generator=g))
    matched, conf_t = match(boxes, labels, priors, iou_thres=0.5)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if len(b) == 0:
            assert (conf_t[i] == 0).all()
            continue
        iou = box_iou(b, cxcywh_to_xyxy(priors))
        best_prior = iou.argmax(1)
        best_iou, best_gt = iou.max(0)
        best_iou[best_prior] = 2.0
        for j, pj in enumerate(best_prior.tolist()):
            best_gt[pj] = j
        ref = lab[best_gt].masked_fill(best_iou < 0.5, 0)
        assert torch.equal(conf_t[i], ref)
        pos = ref > 0
        torch.testing.assert_close(matched[i][pos], b[best_gt][pos])


# ---------------------------------------------------------------------------------------------- loss


def test_multibox_loss_empty_targets_is_finite() -> None:
    priors = PriorBox(AnchorConfig())(128, 128)
    loc = torch.randn(2, len(priors), 4, requires_grad=True)
    conf = torch.randn(2, len(priors), 4, requires_grad=True)
    crit = MultiBoxLoss(loc_loss="l1")
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = crit(loc, conf, priors, empty)
    assert set(losses) == {"loss_loc", "loss_cls"}
    assert losses["loss_loc"] == 0 and torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert torch.isfinite(conf.grad).all() and torch.isfinite(loc.grad).all()
    # a degenerate box (zero width, e.g. after a crop) is dropped, not encoded to log(0)
    degenerate = [{"boxes": torch.tensor([[0.2, 0.2, 0.2, 0.5]]), "labels": torch.tensor([1])}] * 2
    assert all(torch.isfinite(v) for v in crit(loc, conf, priors, degenerate).values())


def test_loss_stays_fp32_under_bf16_autocast() -> None:
    model = build("faceboxes").train()
    x = torch.rand(2, 3, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(x, targets())
        loc, _ = model.net(x)
    assert loc.dtype == torch.bfloat16  # the net did run under autocast...
    assert all(v.dtype == torch.float32 for v in losses.values())  # ...the loss did not


def test_loss_decreases_when_overfitting_one_batch() -> None:
    model = build("faceboxes", "model.loc_loss='l1'").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t = torch.rand(2, 3, 128, 128), targets()
    first = None
    for _ in range(50):
        loss = sum(model(x, t).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ------------------------------------------------------------------------------------------ the models


def test_anchor_detector_inputs_and_output_order() -> None:
    """What AnchorDetector adds to the every-model test of test_models.py (shared by all native models)."""
    model = build("faceboxes", "eval.max_det=20", "eval.conf_thres=0.0").train()
    losses = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], targets())  # a list stacks
    assert set(losses) == {"loss_loc", "loss_cls"}
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="same-size images"):
        model([torch.rand(3, 128, 128), torch.rand(3, 128, 96)], targets())
    model.eval()
    with torch.inference_mode():
        out = model((torch.rand(2, 3, 128, 96) * 255).to(torch.uint8))  # uint8 straight from a decoder
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"} and len(det["scores"]) == 20
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # best first, as torchvision


def test_inference_mode_first_then_train() -> None:
    """Priors first built under inference_mode (an eval before training) must not break backward."""
    model = build("faceboxes").eval()
    with torch.inference_mode():
        model(torch.rand(1, 3, 128, 128))
    losses = model.train()(torch.rand(2, 3, 128, 128), targets())
    sum(losses.values()).backward()


def test_losses_import_first_has_no_cycle() -> None:
    """models -> losses -> ops, never back: the criterion alone does not import the models package, and
    importing the models after it works (the other order is what every ``import accel_det.models`` does)."""
    code = (
        "import sys; from accel_det.losses import MultiBoxLoss; "
        "bad = sorted(m for m in sys.modules if m.startswith('accel_det.models')); assert not bad, bad; "
        "from accel_det.models.native import AnchorDetector"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_options() -> None:
    # one input channel, one class
    model = build("ssdlite_mobilenet_v3", "model.channels=1", "data.class_names=['face']").train()
    t = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
    assert torch.isfinite(sum(model(torch.rand(1, 1, 128, 128), t).values()))
    with pytest.raises(ValueError, match="strides"):  # anchors must follow the net's strides
        build("faceboxes", "model.anchors.steps=[16, 32, 64]")
    taps = MobileNetV3Taps("large")
    assert [f.shape[-1] for f in taps(torch.rand(1, 3, 128, 128))] == [16, 8, 4]
    taps = MobileNetV3Taps("small")
    assert [f.shape[-1] for f in taps(torch.rand(1, 3, 128, 128))] == [16, 8, 4]


# -------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("mode", ["default", "xavier", "kaiming"])
def test_init_modes_and_background_prior(mode: str) -> None:
    model = build("faceboxes", f"model.init='{mode}'")
    k = 3
    b = background_bias(k, 0.01)
    probs = torch.softmax(torch.tensor([b, 0.0, 0.0, 0.0]), 0)
    torch.testing.assert_close(probs, torch.tensor([0.97, 0.01, 0.01, 0.01]))
    for conv in model.net.classification_convs():
        assert torch.allclose(conv.bias[0 :: k + 1], torch.tensor(b)) and (conv.bias.view(-1, k + 1)[:, 1:] == 0).all()
    # with the conf weights at zero only the bias speaks: every prior starts at P(background) = 0.97
    with torch.no_grad():
        for conv in model.net.classification_convs():
            conv.weight.zero_()
        _, conf = model.eval().net(torch.rand(1, 3, 128, 128))
    torch.testing.assert_close(conf.softmax(-1)[..., 0], torch.full(conf.shape[:2], 0.97))


def test_init_weights_modes() -> None:
    conv = torch.nn.Conv2d(8, 16, 3)
    before = conv.weight.clone()
    init_weights(conv, "default")
    assert torch.equal(conv.weight, before)
    init_weights(conv, "xavier")
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (8 * 9 + 16 * 9)), rel=0.2)
    assert (conv.bias == 0).all()
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(conv, "orthogonal")
    with pytest.raises(ValueError, match="multiple of"):
        init_conf_bias(torch.nn.Conv2d(4, 10, 1), num_classes=3)
    assert background_bias(200, 0.01) == 0.0  # K p >= 1: no valid split, uniform start


# ---------------------------------------------------------------------------------- recompute and SyncBN

NATIVE = ["faceboxes", "ssdlite_mobilenet_v3", "ssdlite_resnet18"]


@pytest.mark.parametrize("name", NATIVE)
def test_recompute_same_loss_gradients_and_bn_stats(name: str) -> None:
    """Every backbone stage recomputed in backward: the same loss, gradients and BatchNorm buffers (updated
    once per step, not again by the recomputation)."""
    from accel_det.catalog import NATIVE_INFO
    from accel_det.models.recompute import stage_owner

    stages = len(NATIVE_INFO[name].stages)
    results = []
    for n in (0, stages):
        model = build(name, f"model.recompute={n}").train()
        assert stage_owner(model.net).recompute == n
        calls = [0]
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        torch.manual_seed(1)
        saved: list[int] = []  # bytes autograd keeps for backward (a checkpoint keeps its stage's to itself)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t.nbytes) or t, lambda t: t):
            losses = model(torch.rand(2, 3, 128, 128), targets())
        sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append(
            ({k: v.detach() for k, v in losses.items()}, grads, dict(model.state_dict()), calls[0], sum(saved))
        )
    (l0, g0, s0, calls0, bytes0), (l1, g1, s1, calls1, bytes1) = results
    assert calls1 > calls0  # the stages really ran again in backward
    assert bytes1 < 0.7 * bytes0, (bytes0, bytes1)  # ... and their activations were not kept
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-6, msg=k)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-6, atol=1e-6, msg=k)
    tracked = [v for k, v in s1.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 1 for v in tracked)


def test_recompute_stages_match_the_catalog() -> None:
    from accel_det.catalog import NATIVE_INFO
    from accel_det.models.recompute import set_recompute, stage_owner

    for name in NATIVE:
        model = build(name)
        assert tuple(stage_owner(model.net).stage_names) == NATIVE_INFO[name].stages
    # MobileNetV3's stages end where the stride doubles: each halves the map (features[0] is the stride-2 stem)
    taps = MobileNetV3Taps("large")
    x, sizes, start = torch.rand(1, 3, 64, 64), [], 0
    for end in taps.stage_ends:
        x = taps._blocks(start, end, x)
        sizes.append(x.shape[-1])
        start = end + 1
    assert sizes == [32, 16, 8, 4, 2]
    # built without validation (recipe.model_construct, an edited recipe.json): the builder still says it
    with pytest.raises(RecipeError, match=r"^model.recompute: 6 but faceboxes has 5 backbone stages \(conv1, "):
        set_recompute(build("faceboxes").net, 6, "faceboxes")
    with pytest.raises(RecipeError, match="model.recompute: 6 but ssdlite_resnet18 has 5 backbone stages"):
        load_recipe(None, ["model.name='ssdlite_resnet18'", "model.recompute=6"])


def test_recompute_only_when_training_with_grads() -> None:
    model = build("faceboxes", "model.recompute=2").eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 128, 128))  # no checkpoint in eval: nothing to recompute
    model.train()
    with torch.no_grad():
        loss = sum(model(torch.rand(2, 3, 128, 128), targets()).values())
    assert not loss.requires_grad


def test_convert_sync_bn() -> None:
    from accel_det.models.sync_bn import convert_sync_bn

    model = build("ssdlite_resnet18")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    same, note = convert_sync_bn(model, 1)
    assert same is model and note == "model.sync_bn: one process, BatchNorm kept (nothing to synchronise)"
    same, note = convert_sync_bn(model, 2, torch.device("cpu"))
    assert same is model and "needs GPUs (running on cpu)" in note and "\n" not in note
    synced, note = convert_sync_bn(model, 2, "cuda")  # converting needs no process group, nor a GPU
    assert note == f"model.sync_bn: {n_bn} BatchNorm layers -> SyncBatchNorm over 2 processes"
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert {id(p) for p in synced.parameters()} == params  # an optimizer built before still holds them
    assert set(synced.state_dict()) == keys  # checkpoints load either way
    # the stages look their modules up per call, so recompute runs the converted ones
    synced.net.backbone.recompute = 5
    synced.train()
    sum(synced(torch.rand(2, 3, 128, 128), targets()).values()).backward()  # no process group: plain BN maths
