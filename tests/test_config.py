"""Recipe validation: every malformed recipe gives one clean line naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accel_det.config import RecipeError, load_recipe, parse_override, reference_markdown

BAD = [
    ('[optimizer]\nlr = -1\n', "optimizer.lr: Input should be greater than 0"),
    ('[optimizer]\nlrr = 0.1\n', "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    ('[trian]\nmax_epoch = 3\n', "trian: unknown key (did you mean 'train'?)"),
    ('[model]\nname = "faceboxs"\n', "model.name: unknown model 'faceboxs' (did you mean 'faceboxes'?)"),
    ('[scheduler]\nmilestones = [20, 10]\n', "scheduler.milestones: must be strictly increasing"),
    ('[model]\nnum_classes = 7\n', "model.num_classes = 7 but data.class_names has 3 names"),
    ('[train]\nmax_epoch = "ten"\n', "train.max_epoch: Input should be a valid integer"),
    ('[scheduler]\nwarmup_factor = 1.5\n', "scheduler.warmup_factor: Input should be less than or equal to 1"),
    ('[data]\nformat = "pascal"\n', "data.format: Input should be 'voc', 'coco', 'yolo' or 'synthetic'"),
    ('[data]\nclass_names = ["a", "a"]\n', "data.class_names: duplicate class names: a"),
    ('[data]\nclass_names = []\n', "data.class_names: needs at least one class name"),
    ('[mission]\nname = "../etc"\n', "mission.name: must be a non-empty name"),
    ('[model]\nname = "tv_fcos_resnet50_fpn"\n[model.anchors]\nsteps = [8]\nmin_sizes = [[16]]\n',
     "model: [model.anchors] applies only to native models"),
    ('[model]\nname = "faceboxes"\n[model.anchors]\nsteps = [32, 64]\nmin_sizes = [[32]]\n',
     "model.anchors: min_sizes has 1 feature maps but steps has 2"),
    ('[scheduler]\nmilestones = [5, 50]\n[train]\nmax_epoch = 10\n',
     "scheduler.milestones: 50 is past train.max_epoch = 10"),
    ('[data]\ntrain_images = "img"\n', "data: train_images/val_images apply only to format = 'coco'"),
    ('[optimizer]\nname = "adam"\nnesterov = true\n', "optimizer: nesterov needs name = 'sgd'"),
    ('[eval]\nmetric = "map"\n', "eval.metric: Input should be 'coco', 'voc07' or 'voc12'"),
    ('[train]\nmixed_precision = "fp8"\n', "train.mixed_precision: Input should be"),
    ('[optimizer\nlr = 1\n', "not valid TOML"),
    ('[optimizer]\nname = "adam"\nbetas = [0.9, 1.0]\n', "optimizer.betas.1: Input should be less than 1"),
    ('[optimizer]\nlr = inf\n', "optimizer.lr: Input should be a finite number"),
    ('[log]\ntrackers = ["tensorbord"]\n', "log.trackers: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_malformed_recipe_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert expected in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_are_toml_values() -> None:
    assert parse_override("train.max_epoch=5") == (["train", "max_epoch"], 5)
    assert parse_override("optimizer.lr=1e-2") == (["optimizer", "lr"], 0.01)
    assert parse_override("data.augments=['hflip']") == (["data", "augments"], ["hflip"])
    assert parse_override("model.name=faceboxes") == (["model", "name"], "faceboxes")
    r = load_recipe(None, ["train.max_epoch=5", "data.batch_size=4", "mission.round=3"])
    assert (r.train.max_epoch, r.data.batch_size) == (5, 4)
    assert r.run_dir() == Path("runs/demo/round3")
    with pytest.raises(RecipeError, match="optimizer.lr: Input should be greater than 0"):
        load_recipe(None, ["optimizer.lr=0"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(None, ["optimizer.lr"])


def test_num_classes_defaults_to_class_names() -> None:
    r = load_recipe(None, ["data.class_names=['a','b']"])
    assert r.num_classes == 2


def test_reference_lists_every_key() -> None:
    ref = reference_markdown()
    for key in ("mission.name", "model.anchors.min_sizes", "data.synthetic.seed", "eval.backend", "log.trackers"):
        assert f"`{key}`" in ref


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "accel_det.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])


def test_validate_cli_error_exit_2_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[optimizer]\nlr = -1\n")
    res = _run_cli("validate", str(path))
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {path}: optimizer.lr: Input should be greater than 0"
    assert "Traceback" not in res.stderr


def test_validate_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from accel_det.cli import main; rc = main(['validate', '-q', 'recipes/voc_ssd.toml']);"
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr


def test_overrides_after_options_and_unknown_options() -> None:
    ok = _run_cli("validate", "recipes/demo.toml", "-q", "optimizer.lr=0.1")
    assert ok.returncode == 0, ok.stderr
    bad = _run_cli("validate", "recipes/demo.toml", "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
