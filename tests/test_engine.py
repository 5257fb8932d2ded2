"""The engine's edges, in process and tiny: the accumulation tail, clip_grad_norm, bf16 autocast on the CPU,
checkpoint pruning and pointers, native post-processing on hand-made priors, and the loop's try/finally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from tiny_run import tiny_overrides
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.engine.checkpoint import Checkpointer, checkpoint_name, resolve_checkpoint
from accel_det.engine.distributed import build_accelerator
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.preempt import StopRequest
from accel_det.engine.progress import RunClock, RunLog, TrainProgress
from accel_det.engine.setup import Run
from accel_det.engine.trainer import train_one_epoch, train_step
from accel_det.errors import DataError

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class ToyDetector(nn.Module):
    """loss = mean over the batch of <w, image>: the gradient of a batch is the mean of its images."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, images: torch.Tensor, targets: Any = None) -> dict[str, torch.Tensor]:
        return {"loss_toy": (images.flatten(1) @ self.w).mean()}


def _collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class _Steps(Hook):
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weights: list[torch.Tensor] = []

    def after_step(self, state: TrainState) -> None:
        self.weights.append(self.model.w.detach().clone())


def _toy_run(tmp_path: Path, overrides: list[str], batches: torch.Tensor) -> tuple[Run, _Steps]:
    recipe = load_recipe(None, [f"output.root='{tmp_path}'", "train.log_freq=100", *overrides])
    accelerator = build_accelerator(recipe)
    model = ToyDetector(batches.shape[-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    samples = [(x, {}) for x in batches.reshape(-1, batches.shape[-1])]
    loader = torch.utils.data.DataLoader(samples, batch_size=batches.shape[1], collate_fn=_collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    log = RunLog(accelerator, tmp_path)
    hook = _Steps(model)
    run = Run(recipe, accelerator, tmp_path, log, model, optimizer, scheduler, None, loader, None, TrainState(),
              eval_due=lambda e: False, hooks=[hook])
    return run, hook


def _one_epoch(run: Run) -> None:
    clock = RunClock(1, len(run.train_loader), run.eval_due, 0)
    with TrainProgress(run.log, clock, run.recipe.train.log_freq) as progress:
        progress.start_epoch(0)
        with StopRequest(run.accelerator) as stop:
            train_one_epoch(run, 0, progress, stop)


def test_accumulation_tail_averages_over_the_batches_it_saw(tmp_path: Path) -> None:
    # 5 batches, accumulation 3: a step after batch 3 and one after batch 5 over the last 2 batches only
    batches = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(0))
    run, hook = _toy_run(tmp_path, ["train.accumulation_freq=3"], batches)
    _one_epoch(run)
    assert run.state.global_step == 2
    grads = batches.mean(dim=1)  # (5, 4): gradient of each batch
    step1 = -grads[:3].mean(0)
    step2 = step1 - grads[3:].mean(0)  # the mean of 2 batches, not their sum / 3
    torch.testing.assert_close(hook.weights[0], step1)
    torch.testing.assert_close(hook.weights[1], step2)


def test_clip_grad_norm_clips(tmp_path: Path) -> None:
    batches = 100 * torch.ones(2, 2, 4)  # gradient norm 200 per step
    run, hook = _toy_run(tmp_path, ["train.clip_grad_norm=0.5"], batches)
    _one_epoch(run)
    first = hook.weights[0]
    assert float(first.norm()) == pytest.approx(0.5, rel=1e-5)  # lr 1: the update is the clipped gradient


def test_bf16_autocast_on_cpu_keeps_native_losses_fp32() -> None:
    recipe = load_recipe(None, ["model.name='faceboxes'", "model.img_dim=128", "train.mixed_precision='bf16'"])
    accelerator = build_accelerator(recipe)
    assert accelerator.mixed_precision == "bf16"
    from accel_det.models import build_model

    model, _ = build_model(recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    before = [p.detach().clone() for p in model.parameters()]
    losses, skipped = train_step(accelerator, model, optimizer, scheduler, images, targets)
    assert skipped is None and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_keep_last_prunes_but_never_best_or_last(tmp_path: Path) -> None:
    recipe = load_recipe(None, [])
    accelerator = build_accelerator(recipe)
    accelerator.prepare(nn.Linear(2, 2))
    ckpt = Checkpointer(accelerator, tmp_path, keep_last=1)
    root = tmp_path / "checkpoints"

    def saved() -> list[str]:
        return sorted(p.name for p in root.glob("epoch_*"))

    def pointer(name: str) -> str:
        return (root / name).read_text().strip()

    def save(epoch: int, step: int = 0, mid: bool = False, best: bool = False) -> None:
        name = checkpoint_name(epoch, step, mid_epoch=mid)
        ckpt.save(name, TrainState(epoch=epoch, global_step=step).to_dict(), is_best=best)

    save(1, best=True)
    save(2)
    assert saved() == ["epoch_0001", "epoch_0002"] and pointer("best") == "epoch_0001"
    save(2, step=7, mid=True)  # inside epoch 3
    assert saved() == ["epoch_0001", "epoch_0002", "epoch_0002_step_00000007"]
    assert pointer("last") == "epoch_0002_step_00000007"
    save(2, step=8, mid=True)  # a newer mid-epoch checkpoint replaces the older one
    assert saved() == ["epoch_0001", "epoch_0002", "epoch_0002_step_00000008"]
    save(3)  # and an epoch checkpoint replaces it; keep_last = 1 keeps best and last only
    assert saved() == ["epoch_0001", "epoch_0003"] and pointer("last") == "epoch_0003"
    ckpt.update("epoch_0003", {"best_metric": 0.5}, is_best=True)
    assert saved() == ["epoch_0003"] and pointer("best") == pointer("last") == "epoch_0003"
    assert json.loads((root / "epoch_0003" / "trainer_state.json").read_text())["best_metric"] == 0.5
    save(3)  # a re-save of an existing name replaces it whole
    assert saved() == ["epoch_0003"] and not list(root.glob(".*"))


def test_resuming_an_older_checkpoint_sets_newer_ones_aside_and_best_follows(tmp_path: Path) -> None:
    recipe = load_recipe(None, [])
    accelerator = build_accelerator(recipe)
    accelerator.prepare(nn.Linear(2, 2))
    ckpt = Checkpointer(accelerator, tmp_path, keep_last=0)
    root = tmp_path / "checkpoints"
    for epoch in (1, 2, 3):
        ckpt.save(checkpoint_name(epoch), TrainState(epoch=epoch).to_dict(), is_best=epoch == 2)
    # resuming from epoch 1, whose history's best was epoch 1: epoch 2's "best" belongs to an abandoned past
    assert ckpt.rewind(root / "epoch_0001", best_epoch=1) == ["epoch_0002", "epoch_0003"]
    assert sorted(p.name for p in root.glob("epoch_*")) == ["epoch_0001"]
    assert sorted(p.name for p in root.glob(".abandoned-*/*")) == ["epoch_0002", "epoch_0003"]
    assert (root / "last").read_text().strip() == (root / "best").read_text().strip() == "epoch_0001"
    assert ckpt.rewind(root / "epoch_0001", best_epoch=None) == []  # the newest already: nothing to do


def test_resolve_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("epoch_0001", "epoch_0002"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    (root / "last").write_text("epoch_0003\n")  # a crash between the renames of epoch 3's save
    notes: list[str] = []
    assert resolve_checkpoint(tmp_path, "last", notes) == root / "epoch_0002"
    assert "not a complete checkpoint" in notes[0]
    assert resolve_checkpoint(tmp_path, "auto") == root / "epoch_0002"
    (root / "last").write_text("epoch_0001\n")  # a crash after epoch 2's rename, before its pointer moved
    assert resolve_checkpoint(tmp_path, "auto") == root / "epoch_0002"
    assert resolve_checkpoint(tmp_path, "last") == root / "epoch_0001"
    (root / "last").unlink()  # killed before the first pointer was written
    assert resolve_checkpoint(tmp_path, "auto") == root / "epoch_0002"
    assert resolve_checkpoint(tmp_path / "elsewhere", "auto") is None


def test_an_interrupted_resave_is_put_back(tmp_path: Path) -> None:
    from accel_det.engine.checkpoint import recover_interrupted_save

    root = tmp_path / "checkpoints"
    (root / ".epoch_0002.old-ab12cd34").mkdir(parents=True)  # the old copy, moved aside; the new one never came
    (root / ".epoch_0002.old-ab12cd34" / "trainer_state.json").write_text("{}")
    (root / ".epoch_0001.old-ffffffff").mkdir()  # an old copy whose name was re-saved: nothing to put back
    (root / "epoch_0001").mkdir()
    assert recover_interrupted_save(root) == ["epoch_0002"]
    assert resolve_checkpoint(tmp_path, "auto") == root / "epoch_0002"


def test_postprocess_on_hand_made_priors() -> None:
    from accel_det.models.native import PostProcess

    # four priors (normalised cx, cy, w, h); p1 overlaps p0 (IoU 0.92), p2 and p3 overlap nothing
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.26, 0.26, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5],
                           [0.25, 0.75, 0.5, 0.5]])
    logits = torch.tensor([[0.0, 4.0, 0.0], [0.0, 3.0, 1.5], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])  # bg, c1, c2
    probs = logits.softmax(-1)
    loc = torch.zeros(1, 4, 4)  # no offsets: every box is its prior
    post = PostProcess((0.1, 0.2), conf_thres=0.1, iou_thres=0.5, max_det=3)
    (det,) = post(loc, logits[None], priors, (100, 200))  # h 100, w 200
    # above 0.1: p0c1, p1c1 (suppressed by p0c1: same class, IoU 0.92), p2c2, p1c2 (other class: kept),
    # p2c1 (cut by max_det = 3); p3 is background
    expected = [(0, 1), (2, 2), (1, 2)]
    assert det["labels"].tolist() == [c for _, c in expected]
    torch.testing.assert_close(det["scores"], torch.stack([probs[p, c] for p, c in expected]))
    boxes = {0: [0.0, 0.0, 100.0, 50.0], 1: [2.0, 1.0, 102.0, 51.0], 2: [100.0, 50.0, 200.0, 100.0]}
    torch.testing.assert_close(det["boxes"], torch.tensor([boxes[p] for p, _ in expected]))
    # a higher threshold keeps fewer; max_det bounds the count
    (det,) = PostProcess((0.1, 0.2), conf_thres=0.5, iou_thres=0.5, max_det=100)(loc, logits[None], priors,
                                                                                (100, 200))
    assert det["labels"].tolist() == [1, 2]


class _Raise(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, state: TrainState) -> None:
        if state.global_step == self.step:
            raise DataError("injected: a sample went bad")


@pytest.mark.slow
def test_a_failing_run_logs_where_it_stopped_and_releases_everything(tmp_path: Path) -> None:
    from accel_det.engine.trainer import run_training

    recipe = load_recipe(DEMO, tiny_overrides(tmp_path / "runs", tmp_path / "data", **{"train.max_epoch": 2}))
    with pytest.raises(DataError, match="injected"):
        run_training(recipe, hooks=[_Raise(step=4)])
    run_dir = recipe.run_dir()
    log = (run_dir / "log.txt").read_text()
    assert "stopped in epoch 2/2, at optimizer step 4: error: injected: a sample went bad" in log
    # the lock is free again: a new run in the same dir resumes from epoch 1's checkpoint and finishes
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    state = run_training(recipe)
    assert state is not None and state.epoch == 2
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "resume"] == [1]


class _FixedBox(nn.Module):
    """Detects one box at the top-left quarter of whatever square input it is given."""

    def forward(self, images: torch.Tensor, targets: Any = None) -> list[dict[str, torch.Tensor]]:
        n, _, h, w = images.shape
        box = torch.tensor([[0.0, 0.0, w / 2, h / 4]])
        return [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])} for _ in range(n)]


def test_predict_maps_boxes_back_to_the_original_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import accel_det.engine.run as run_module
    from accel_det.engine.run import OpenedRun, Weights
    from accel_det.predict import predict

    recipe = load_recipe(None, ["model.img_dim=64"])
    opened = OpenedRun(tmp_path, recipe, Weights(tmp_path / "w.safetensors", "final"), _FixedBox())
    monkeypatch.setattr(run_module, "open_run", lambda *args, **kwargs: opened)
    from PIL import Image

    Image.new("RGB", (200, 100), (40, 80, 120)).save(tmp_path / "wide.png")  # w 200, h 100
    Image.new("RGB", (30, 90), (40, 80, 120)).save(tmp_path / "tall.png")
    out = predict(tmp_path, [str(tmp_path / "wide.png"), str(tmp_path / "tall.png")], tmp_path / "out", conf=0.5)
    boxes = {Path(r["file"]).name: r["detections"][0]["box"] for r in out}
    assert boxes == {"wide.png": [0.0, 0.0, 100.0, 25.0], "tall.png": [0.0, 0.0, 15.0, 22.5]}
    assert {r["detections"][0]["class_name"] for r in out} == {"square"}


def test_run_clock_eta_counts_remaining_epochs_and_evaluations() -> None:
    clock = RunClock(max_epoch=4, batches_per_epoch=10, eval_due=lambda e: e % 2 == 0, val_batches=6)
    assert clock.eta(0, 0) is None  # nothing measured yet
    clock.add_batches(10, 5.0)  # 0.5 s per batch
    # in epoch 1 (0-based) after 0 batches: 3 epochs of 10 batches, evals after epochs 2 and 4 estimated
    # at 6 val batches x 0.5 s / 3 until one is timed
    assert clock.eta(1, 0) == pytest.approx(30 * 0.5 + 2 * 1.0)
    clock.add_between(2, 4.0)  # the eval after epoch 2 took 4 s; epochs without eval cost nothing measured
    clock.add_between(3, 0.5)
    assert clock.eta(3, 5) == pytest.approx(5 * 0.5 + 4.0)


class _BoxAt(nn.Module):
    """Detects one box at fixed model-input pixels."""

    def forward(self, images: torch.Tensor, targets: Any = None) -> list[dict[str, torch.Tensor]]:
        box = torch.tensor([[8.0, 20.0, 40.0, 40.0]])
        return [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])} for _ in images]


def test_predict_undoes_the_letterbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import accel_det.engine.run as run_module
    from accel_det.engine.run import OpenedRun, Weights
    from accel_det.predict import predict

    recipe = load_recipe(None, ["model.img_dim=64", "data.letterbox=true"])
    opened = OpenedRun(tmp_path, recipe, Weights(tmp_path / "w.safetensors", "final"), _BoxAt())
    monkeypatch.setattr(run_module, "open_run", lambda *args, **kwargs: opened)
    from PIL import Image

    Image.new("RGB", (200, 100), (40, 80, 120)).save(tmp_path / "wide.png")
    (rec,) = predict(tmp_path, [str(tmp_path / "wide.png")], tmp_path / "out", conf=0.5)
    # 200 x 100 letterboxed into 64: scale 0.32, 64 x 32 content, 16 px of padding above and below
    assert rec["detections"][0]["box"] == [25.0, 12.5, 125.0, 75.0]
