"""Recipe validation: every malformed recipe gives one clean line naming the file and the key."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from accel_det import catalog, config, trackers
from accel_det.catalog import default_anchors, feature_strides
from accel_det.config import (
    KNOWN_MODELS,
    NATIVE_MODELS,
    TORCHVISION_MODELS,
    AnchorConfig,
    RecipeError,
)
from accel_det.config_io import load_recipe, parse_override, reference_markdown
from accel_det.trackers import missing_tracker_packages

BAD = [
    ('[optimizer]\nlr = -1\n', "optimizer.lr: Input should be greater than 0"),
    ('[optimizer]\nlrr = 0.1\n', "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    ('[trian]\nmax_epoch = 3\n', "trian: unknown key (did you mean 'train'?)"),
    ('[model]\nname = "faceboxs"\n', "model.name: unknown model 'faceboxs' (did you mean 'faceboxes'?)"),
    ('[scheduler]\nmilestones = [20, 10]\n', "scheduler.milestones: must be strictly increasing"),
    ('[model]\nnum_classes = 7\n', "model.num_classes = 7 but data.class_names has 3 names"),
    ('[train]\nmax_epoch = "ten"\n', "train.max_epoch: Input should be a valid integer"),
    ('[scheduler]\nwarmup_factor = 1.5\n', "scheduler.warmup_factor: Input should be less than or equal to 1"),
    ('[data]\nformat = "pascal"\n', "data.format: Input should be 'voc', 'coco', 'yolo', 'hf' or 'synthetic'"),
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
    # anchors that cannot fit the chosen model
    ('[model]\nname = "faceboxes"\n[model.anchors]\nsteps = [8, 16, 32]\nmin_sizes = [[16], [32], [64]]\n',
     "model.anchors.steps: must be [32, 64, 128]: faceboxes predicts on 3 feature maps at these strides "
     "(got [8, 16, 32])"),
    ('[model.anchors]\nmin_sizes = [[16], [32], [64]]\n',
     "model.anchors.min_sizes: ssdlite_mobilenet_v3 has 4 feature maps (strides [8, 16, 32, 64]) "
     "but min_sizes lists 3"),
    ('[model]\nname = "ssdlite_resnet18"\n[model.anchors]\nsteps = [8, 16, 32]\n',
     "model.anchors.steps: ssdlite_resnet18 has 4 feature maps (strides [8, 16, 32, 64]) but steps lists 3"),
    ('[model.anchors]\naspect_ratios = [[2], [2]]\n',
     "model.anchors.aspect_ratios: ssdlite_mobilenet_v3 has 4 feature maps"),
    ('[model]\nname = "faceboxes"\n[model.anchors]\nsteps = [32, 64, 128]\nmin_sizes = [[32], [64]]\n',
     "model.anchors: min_sizes has 2 feature maps but steps has 3"),
    ('[model]\nname = "faceboxes"\nimg_dim = 128\n[data]\nbatch_size = 1\n',
     "model.img_dim: 128 makes the stride-128 feature map of faceboxes 1x1, and BatchNorm cannot train on it "
     "with data.batch_size = 1: use img_dim > 128 or data.batch_size >= 2"),
    ('[model]\nimg_dim = 64\n[data]\nbatch_size = 1\n', "model.img_dim: 64 makes the stride-64 feature map"),
    # training features (issue 16)
    ('[model]\nrecompute = 6\n', "model.recompute: 6 but ssdlite_mobilenet_v3 has 5 backbone stages (features.0-1, "),
    ('[model]\nname = "tv_ssd300_vgg16"\nrecompute = 1\n', "model.recompute: applies only to native models"),
    ('[model]\nsync_bn = 1\n', "model.sync_bn: Input should be a valid boolean"),
    ('[scheduler]\nwarmup_momentum = 1.0\n', "scheduler.warmup_momentum: Input should be less than 1"),
    ('[scheduler]\nwarmup_bias_lr = 0.1\n', "scheduler.warmup_bias_lr: ramps over scheduler.warmup_iters, which is 0"),
    ('[train.ema]\ndecay = 1.0\n', "train.ema.decay: Input should be less than 1"),
    ('[train.ema]\ndecay = 0\n', "train.ema.decay: Input should be greater than 0"),
    ('[train.ema]\nwarmup = -1\n', "train.ema.warmup: Input should be greater than or equal to 0"),
    ('[train.ema]\nenable = true\n', "train.ema.enable: unknown key (did you mean 'enabled'?)"),
    ('[train]\nmax_nonfinite = 0\n', "train.max_nonfinite: Input should be greater than 0"),
    ('[train]\nloss_scale = {init = 0}\n', "train.loss_scale.init: Input should be greater than 0"),
    ('[train.loss_scale]\ngrowth_interval = 0\n', "train.loss_scale.growth_interval: Input should be greater than 0"),
    ('[train]\nprofile_steps = [5]\n', "train.profile_steps: must be [] or [start, end] with 0 < start <= end"),
    ('[train]\nprofile_steps = [5, 3]\n', "train.profile_steps: must be [] or [start, end]"),
    ('[train]\nprofile_steps = [0, 3]\n', "train.profile_steps.0: Input should be greater than 0"),
    ('[[train.callbacks]]\ntarget = "nodots"\n',
     "train.callbacks.0.target: 'nodots' should look like 'package.module:Class'"),
    ('[[train.callbacks]]\ntarget = "accel_det.engine.hooks:Hook"\n[[train.callbacks]]\ntarget = "no_such_pkg_x.m:C"\n',
     "train.callbacks.1.target: module 'no_such_pkg_x.m' not found"),
    ('[[train.callbacks]]\nkwargs = {a = 1}\n', "train.callbacks.0.target: Field required"),
    ('[[train.callbacks]]\ntarget = "accel_det.engine.hooks:Hook"\nkwarg = {}\n',
     "train.callbacks.0.kwarg: unknown key"),
    ('[eval]\nnms_time_limit = -1\n', "eval.nms_time_limit: Input should be greater than or equal to 0"),
    # strict scalars
    ('[train]\nmax_epoch = true\n', "train.max_epoch: Input should be a valid integer"),
    ('[train]\ngpu_train = 1\n', "train.gpu_train: Input should be 'auto' or a valid boolean"),
    # duplicate keys and tables name the key
    ('[optimizer]\nname = "sgd"\nlr = 0.1\nlr = 0.2\n', "not valid TOML: duplicate key 'lr' in [optimizer] (line 4)"),
    ('[optimizer]\nlr = 0.1\n[optimizer]\nname = "sgd"\n', "not valid TOML: table [optimizer] defined twice (line 3)"),
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


def test_training_feature_defaults() -> None:
    r = load_recipe(None)
    assert (r.model.sync_bn, r.model.recompute) == (False, 0)
    assert (r.scheduler.warmup_momentum, r.scheduler.warmup_bias_lr) == (0.8, 0.0)
    assert (r.train.ema.enabled, r.train.ema.decay, r.train.ema.warmup) == (False, 0.9999, 2000.0)
    assert (r.train.max_nonfinite, r.train.profile_steps, r.train.callbacks) == (20, [], [])
    assert (r.train.loss_scale.init, r.train.loss_scale.growth_interval) == (65536.0, 2000)
    assert r.eval.nms_time_limit == 0.0
    r = load_recipe(None, ["model.name='faceboxes'", "model.recompute=5", "train.profile_steps=[3, 3]",
                           "train.loss_scale={init = 1024, growth_interval = 10}", "train.ema.warmup=0"])
    assert r.model.recompute == 5 and r.train.profile_steps == [3, 3] and r.train.loss_scale.init == 1024.0


def test_callback_modules_found_without_importing_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module in the working dir (as `python -m` finds it) and a package's submodule, found without running
    the package's __init__ (a user's package may import torch; `validate` must not)."""
    from accel_det.config_train import find_target_module, import_target

    (tmp_path / "my_hooks.py").write_text("class Printer:\n    def __init__(self, every=1):\n        self.every=every")
    (tmp_path / "userpkg" / "sub").mkdir(parents=True)
    (tmp_path / "userpkg" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (tmp_path / "userpkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "sub" / "hooks.py").write_text("class H: ...\n")
    (tmp_path / "bare_folder").mkdir()
    monkeypatch.chdir(tmp_path)
    text = ('[[train.callbacks]]\ntarget = "my_hooks:Printer"\nkwargs = {every = 5}\n'
            '[[train.callbacks]]\ntarget = "userpkg.sub.hooks:H"\n')
    (tmp_path / "r.toml").write_text(text)
    r = load_recipe(tmp_path / "r.toml")
    assert [c.target for c in r.train.callbacks] == ["my_hooks:Printer", "userpkg.sub.hooks:H"]
    assert r.train.callbacks[0].kwargs == {"every": 5}
    assert "userpkg" not in sys.modules
    assert find_target_module("userpkg.nope") is None and find_target_module("bare_folder") is None
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_target("my_hooks:Printer")(every=5).every == 5
    sys.modules.pop("my_hooks", None)


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


# ------------------------------------------------------------------------------------- [model.anchors]


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_partial_anchor_table_takes_the_models_defaults(name: str) -> None:
    r = load_recipe(None, [f"model.name='{name}'", "model.img_dim=256", "model.anchors.variance=[0.2, 0.3]"])
    assert r.model.anchors is not None
    assert r.model.anchors.model_dump() == {**default_anchors(name, 256), "variance": (0.2, 0.3)}
    assert r.model.anchors.model_fields_set == {"variance"}
    # no table at all: the complete defaults, recorded in the recipe (recipe.json)
    r = load_recipe(None, [f"model.name='{name}'", "model.img_dim=256"])
    assert r.model.anchors == AnchorConfig(**default_anchors(name, 256))
    assert json.loads(r.to_json())["model"]["anchors"]["steps"] == list(feature_strides(name))


def test_torchvision_models_have_no_anchors() -> None:
    r = load_recipe(None, ["model.name='tv_fcos_resnet50_fpn'"])
    assert r.model.anchors is None
    with pytest.raises(RecipeError, match="applies only to native models"):
        load_recipe(None, ["model.name='tv_fcos_resnet50_fpn'", "model.anchors.clip=true"])


def test_catalog_defaults() -> None:
    assert AnchorConfig() == AnchorConfig(**default_anchors("faceboxes", 1024))  # standalone = the paper's
    a = default_anchors("ssdlite_mobilenet_v3", 128)
    assert a["min_sizes"][0] == [10.2, 17.9] and a["steps"] == [8, 16, 32, 64] and not a["densify"]
    assert set(KNOWN_MODELS) == set(NATIVE_MODELS) | set(catalog.ANCHOR_FREE_MODELS) | set(TORCHVISION_MODELS)
    assert set(catalog.NATIVE_INFO) == set(NATIVE_MODELS)
    assert config.KNOWN_MODELS is catalog.KNOWN_MODELS  # one list, re-exported


@pytest.mark.parametrize("name", ["faceboxes", "ssdlite_resnet18", "tv_ssd300_vgg16"])
def test_recipe_json_round_trip(tmp_path: Path, name: str) -> None:
    r = load_recipe(None, [f"model.name='{name}'", "model.img_dim=300", "data.class_names=['a']"])
    path = tmp_path / "recipe.json"
    path.write_text(r.to_json())
    assert load_recipe(path) == r
    # a recipe.json of the old code, where native models had "anchors": null, resolves the same
    old = json.loads(r.to_json())
    old["model"]["anchors"] = None
    path.write_text(json.dumps(old))
    assert load_recipe(path) == r


def test_changing_img_dim_rederives_unset_anchor_keys() -> None:
    r = load_recipe(None, ["model.img_dim=128", "model.anchors.clip=true"])
    r.model.img_dim = 256
    assert r.model.anchors == AnchorConfig(**{**default_anchors("ssdlite_mobilenet_v3", 256), "clip": True})
    r.model.name = "faceboxes"
    assert r.model.anchors == AnchorConfig(**{**default_anchors("faceboxes", 256), "clip": True})


def test_catalog_matches_the_nets() -> None:
    """The strides the validator checks are the nets', and the img_dim rule is the one torch enforces:
    predictions and priors agree at any img_dim (even or odd, multiple of the strides or not), and only
    a 1x1 last map with one image per batch cannot train."""
    torch = pytest.importorskip("torch")
    import accel_det.models.faceboxes  # noqa: F401  (registration)
    import accel_det.models.ssd  # noqa: F401
    from accel_det.models.base import MODELS

    for name in NATIVE_MODELS:
        top = max(feature_strides(name))
        model = MODELS.get(name)(load_recipe(None, [f"model.name='{name}'", f"model.img_dim={top + 1}"]))
        assert list(model.net.strides) == list(feature_strides(name))
        model.eval()
        with torch.no_grad():
            for size in (1, 31, top - 1, top, top + 1, 2 * top + 5):
                loc, _ = model.net(torch.rand(1, 3, size, size))
                assert loc.shape[1] == model.priors(size, size).shape[0], (name, size)
        model.train()
        with torch.no_grad():
            model.net(torch.rand(1, 3, top + 1, top + 1))
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                model.net(torch.rand(1, 3, top, top))
            model.net(torch.rand(2, 3, top, top))
        with pytest.raises(RecipeError, match="model.img_dim"):
            load_recipe(None, [f"model.name='{name}'", f"model.img_dim={top}", "data.batch_size=1"])


def test_config_and_catalog_do_not_import_torch() -> None:
    code = "import sys, accel_det.config, accel_det.catalog; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    # a callback's module is looked up, not imported
    code = ("import sys; from accel_det.config_io import load_recipe; "
            "load_recipe(None, ['train.callbacks=[{target = \"accel_det.engine.hooks:Hook\"}]']); "
            "assert 'torch' not in sys.modules and 'accel_det.engine' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------------------------------- strict scalars

NOT_ACCEPTED = [
    ("train.max_epoch", "true"),
    ("train.max_epoch", "3.0"),
    ("train.max_epoch", "'3'"),
    ("mission.round", "false"),
    ("data.synthetic.seed", "true"),  # nested
    ("eval.batch_size", "true"),  # int | None
    ("model.anchors.steps", "[true, 16, 32, 64]"),  # inside a list
    ("model.anchors.clip", "0"),
    ("optimizer.nesterov", "1"),
    ("optimizer.nesterov", "'true'"),
    ("train.gpu_train", "1"),  # "auto" | bool
    ("train.gpu_train", "'true'"),
    ("train.gpu_train", "'yes'"),
    ("optimizer.lr", "true"),  # floats take ints, never bools
    ("optimizer.lr", "'0.1'"),
    ("optimizer.betas", "[0.9, false]"),  # inside a tuple
    ("model.anchors.variance", "[true, 0.2]"),
]


@pytest.mark.parametrize(("key", "value"), NOT_ACCEPTED, ids=[f"{k}={v}" for k, v in NOT_ACCEPTED])
def test_scalars_are_strict(key: str, value: str) -> None:
    with pytest.raises(RecipeError, match=rf"^<defaults>: {re.escape(key)}(\.\d+)?: Input should be") as info:
        load_recipe(None, [f"{key}={value}"])
    assert "more)" not in str(info.value)  # a union's per-member errors are one message


def test_floats_take_ints_and_tuples_take_arrays() -> None:
    r = load_recipe(None, ["optimizer.lr=1", "optimizer.betas=[0, 0.5]", "model.anchors.variance=[1, 1]",
                           "train.gpu_train=false", "eval.batch_size=8"])
    assert r.optimizer.lr == 1.0 and isinstance(r.optimizer.lr, float)
    assert r.optimizer.betas == (0.0, 0.5) and r.model.anchors is not None and r.model.anchors.variance == (1, 1)
    assert r.train.gpu_train is False and r.eval.batch_size == 8


def test_every_scalar_in_the_schema_is_strict() -> None:
    """A new int/float/bool field must use the Strict aliases (config.StrictInt, PosInt, StrictBool, ...)."""
    loose: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("int", "float", "bool") and not node.get("strict"):
                loose.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(config.Recipe.__pydantic_core_schema__, "")
    assert not loose, loose


# ---------------------------------------------------------------------------------- TOML and overrides

DUPLICATES = [
    ("[model]\nname = 'faceboxes'\n[model.anchors]\nmin_sizes = [\n  [32],\n]\nmin_sizes = [[1]]\n",
     "duplicate key 'min_sizes' in [model.anchors] (line 7)"),
    ("[model]\nanchors.clip = true\nanchors.clip = false\n", "duplicate key 'anchors.clip' in [model] (line 3)"),
    ("[[train.callbacks]]\ntarget = 'a'\ntarget = 'b'\n", "duplicate key 'target' in [[train.callbacks]] (line 3)"),
    ("seed = 1\nseed = 2\n", "duplicate key 'seed' (line 2)"),
    ("[data]\nclass_names = ['a']\n[data]\nroot = 'x'\n", "table [data] defined twice (line 3)"),
    ("[data]\nsynthetic = 1\n[data.synthetic]\nseed = 2\n",
     "[data.synthetic] redefines the key 'data.synthetic' set earlier (line 3)"),
    ("[data]\nx = {a = 1, a = 2}\n", "duplicate key 'a' in the inline table 'x' in [data] (line 2)"),
]


@pytest.mark.parametrize(("text", "expected"), DUPLICATES, ids=[d[1][:40] for d in DUPLICATES])
def test_duplicate_toml_key_is_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: not valid TOML: {expected}"


HINTS = [
    ("mission.name=2024-05-01",
     """mission.name: Input should be a valid string (quote the value: mission.name='"2024-05-01"')"""),
    ("mission.name=10:30:00", """(quote the value: mission.name='"10:30:00"')"""),
    ("data.class_names=[face, coin]",
     "data.class_names: Input should be a valid list "
     """(quote the strings in it: data.class_names='["face", "coin"]')"""),
    ("data.class_names=[face, 'coin']", """(quote the strings in it: data.class_names='["face", "coin"]')"""),
    ("data.augments=[hflip]", """(quote the strings in it: data.augments='["hflip"]')"""),
]


@pytest.mark.parametrize(("override", "expected"), HINTS, ids=[h[0] for h in HINTS])
def test_override_quoting_hint(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [override])
    assert str(info.value).startswith("<defaults>: ") and "\n" not in str(info.value)
    assert expected in str(info.value)


def test_no_quoting_hint_for_other_keys_or_values() -> None:
    with pytest.raises(RecipeError) as info:  # the error is at another key than the date override
        load_recipe(None, ["output.root=2024-05-01", "mission.round=-1"])
    assert str(info.value) == "<defaults>: mission.round: Input should be greater than or equal to 0 (+1 more)"
    with pytest.raises(RecipeError) as info:  # a well-formed array
        load_recipe(None, ["data.class_names=['a', 'a']"])
    assert "quote" not in str(info.value)
    assert load_recipe(None, ["mission.name='2024-05-01'"]).mission.name == "2024-05-01"


# ------------------------------------------------------------------------------------------------ trackers


def test_missing_tracker_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    modules: set[str] = set()  # importable
    dists: set[str] = set()  # installed distributions

    def find_spec(name: str, *args: Any) -> object | None:
        return object() if name in modules else None

    def distribution(name: str) -> object:
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return object()

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert missing_tracker_packages(["tensorboard", "wandb", "comet_ml"]) == [
        "log.trackers: 'tensorboard' needs the package tensorboard or tensorboardX (pip install tensorboard)",
        "log.trackers: 'wandb' needs the package wandb (pip install wandb)",
        "log.trackers: 'comet_ml' needs the package comet_ml (pip install comet_ml)",
    ]
    modules.update({"tensorboardX", "wandb", "mlflow"})
    dists.update({"tensorboardX", "wandb", "mlflow-skinny"})  # mlflow-skinny provides the mlflow module
    assert missing_tracker_packages(["tensorboard", "wandb", "mlflow"]) == []
    assert len(missing_tracker_packages(list(config.TRACKERS))) == len(config.TRACKERS) - 3
    modules.add("aim")
    dists.add("aim")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.0.1")  # accelerate's AimTracker: aim 3
    assert missing_tracker_packages(["aim"]) == ["log.trackers: 'aim' needs aim < 4 (pip install 'aim<4')"]


def test_tracker_folder_is_not_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb writes ./wandb/: found as a namespace package, but accelerate (and so we) want the library."""
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    (tmp_path / "wandb").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("wandb") is not None
    assert missing_tracker_packages(["wandb"]) == ["log.trackers: 'wandb' needs the package wandb (pip install wandb)"]


def test_every_tracker_has_its_package() -> None:
    assert set(trackers.TRACKER_PACKAGES) == set(config.TRACKERS)
