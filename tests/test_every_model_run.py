"""timm-style: every registered model, through the shipped recipe that names it, trains an epoch, is evaluated by
the training-time eval path with ``conf_thres = 0`` and serves ``predict``; every label is in 1..K and every box
inside its image. A model added to the registry (and a recipe for it) is covered without editing this file, and so
is a native head on a timm backbone listed in ``catalog.TIMM_EXAMPLES``.

In process (setup + train, then predict) to keep it to seconds per model; tiny: 4 train / 2 val 64 px images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accel_det.catalog import TIMM_EXAMPLES
from accel_det.config_io import load_recipe
from accel_det.models import MODELS

REPO = Path(__file__).parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
CASES = [(name, "") for name in MODELS.names()] + list(TIMM_EXAMPLES)  # (model.name, model.backbone)


def _recipe_for(name: str, backbone: str = "") -> Path:
    for path in RECIPES:
        model = load_recipe(path).model
        if (model.name, model.backbone) == (name, backbone):
            return path
    return REPO / "recipes" / "demo.toml"


def _epochs_not_minutes(path: Path, tmp: Path) -> Path:
    """The recipe without train.time_budget_minutes (exclusive with the tiny run's train.max_epoch = 1)."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.lstrip().startswith("time_budget_minutes")]
    if len(kept) == len(lines):
        return path
    (out := tmp / path.name).write_text("".join(kept))
    return out


def _tiny(tmp: Path, name: str) -> list[str]:
    native = not name.startswith("tv_")
    return [
        f"output.root='{tmp / 'runs'}'", "mission.name='every_model'", f"data.root='{tmp / 'data'}'",
        "data.format='synthetic'", "data.train='ImageSets/Main/train.txt'", "data.val='ImageSets/Main/val.txt'",
        "data.class_names=['circle', 'square', 'triangle']", "data.synthetic.num_train=4",
        "data.synthetic.num_val=2", "data.synthetic.img_size=64", "data.batch_size=2", "data.num_workers=0",
        f"model.name='{name}'", f"model.img_dim={128 if native else 64}", "train.max_epoch=1",
        "scheduler.milestones=[]", "scheduler.warmup_iters=1", "log.trackers=[]", "eval.conf_thres=0.0",
        "eval.max_det=20", "eval.freq=1", "output.checkpoint_freq=1",
    ]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "backbone"), CASES, ids=[f"{n}-{b}" if b else n for n, b in CASES])
def test_every_model_trains_evaluates_and_predicts(tmp_path: Path, name: str, backbone: str) -> None:
    from accel_det.engine.trainer import run_training
    from accel_det.predict import predict

    recipe = load_recipe(_epochs_not_minutes(_recipe_for(name, backbone), tmp_path),
                         [*_tiny(tmp_path, name), f"model.backbone='{backbone}'"])
    state = run_training(recipe)
    assert state is not None and state.epoch == 1
    run_dir = recipe.run_dir()

    # the in-training evaluation accepted the records (labels outside 1..K raise there); boxes inside images
    result = json.loads((run_dir / "eval" / "epoch_0001.json").read_text())
    assert result["num_images"] == 2
    preds = json.loads((run_dir / "eval" / "predictions_epoch_0001.json").read_text())
    sizes = {0: (64, 64), 1: (64, 64)}  # synthetic images are 64 x 64
    for p in preds:
        x, y, w, h = p["bbox"]
        width, height = sizes[p["image_id"]]
        assert p["category_id"] in (1, 2, 3)
        assert -1e-3 <= x and -1e-3 <= y and x + w <= width + 1e-3 and y + h <= height + 1e-3

    images = sorted(next((tmp_path / "data").glob("*/JPEGImages")).glob("*.png"))[:2]
    out = predict(run_dir, [str(p) for p in images], tmp_path / "preds", checkpoint="last", conf=0.0)
    assert len(out) == 2
    for rec in out:
        for det in rec["detections"]:
            assert 1 <= det["label"] <= 3 and det["class_name"] in recipe.data.class_names
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= rec["width"] + 0.01 and 0 <= y1 <= y2 <= rec["height"] + 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv_ssdlite320_mobilenet_v3_large", "faceboxes"])
def test_a_last_batch_of_one_image_is_dropped(tmp_path: Path, name: str) -> None:
    # 21 images in batches of 4 leave one image: BatchNorm cannot train on a batch of one on these models
    from accel_det.engine.trainer import run_training

    over = [*_tiny(tmp_path, name), "data.synthetic.num_train=21", "data.batch_size=4", "model.img_dim=64",
            "eval.compute_map=false"]
    state = run_training(load_recipe(_recipe_for(name), over))
    assert state is not None and state.global_step == 5  # 21 // 4
