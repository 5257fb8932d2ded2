"""``accel-det export``: every supported model exports to ONNX with decode + NMS inside, onnxruntime gives the
eager model's detections for batch 1 and 4 (an image's detections never depend on its neighbours), the outputs
keep the contract (labels 1..K, num_dets <= max_det, zero padding), ``predict`` on the .onnx equals ``predict``
on the run, .pt2 round-trips, and what cannot be exported says so in one line.

No training: a run dir is recipe.json + model.safetensors of a randomly initialised model whose BatchNorm
statistics were calibrated on noise (fresh running stats make the deep features vanish, every logit equals its
bias and all scores tie, which says nothing about the graph), with ``eval.conf_thres`` low enough for
``max_det`` detections per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accel_det.deploy import ExportError
from accel_det.deploy.compare import compare_batch, compare_image
from accel_det.deploy.runner import ExportedDetector
from accel_det.export import export_run

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"
MAX_DET = 30
K = 3  # the demo's circle / square / triangle


def make_run(root: Path, name: str, img_dim: int, *extra: str) -> Path:
    """A run dir of the demo recipe holding a random ``name`` at ``img_dim``, with 4 synthetic val images."""
    return make_run_from(DEMO, root, [
        "data.synthetic.num_train=4", "data.synthetic.num_val=4", f"data.synthetic.img_size={img_dim}",
        f"model.name='{name}'", f"model.img_dim={img_dim}", "eval.conf_thres=0.01", f"eval.max_det={MAX_DET}", *extra,
    ])


def make_run_from(recipe_file: Path, root: Path, overrides: list[str]) -> Path:
    """recipe.json + model.safetensors of the recipe's model, randomly initialised, BatchNorm calibrated on noise;
    output and data under ``root`` (benchmarks/export_speed.py builds its runs with it too)."""
    from safetensors.torch import save_model

    from accel_det.config_io import load_recipe
    from accel_det.models import build_model

    recipe = load_recipe(recipe_file, [f"output.root='{root / 'runs'}'", f"data.root='{root / 'data'}'", *overrides])
    torch.manual_seed(0)
    model, _ = build_model(recipe)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average of the batches below
    model.train()
    dim = recipe.model.img_dim
    with torch.no_grad():
        for _ in range(3):
            x = torch.rand(4, 3, dim, dim)
            if hasattr(model, "net"):
                model.net((x - model.mean) / model.std)
            elif hasattr(model, "head"):  # one-stage torchvision (Faster R-CNN is refused before it runs)
                model.head(list(model.backbone(model.transform(list(x))[0].tensors).values()))
    run_dir = recipe.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.json").write_text(recipe.to_json())
    save_model(model, str(run_dir / "model.safetensors"))
    return run_dir


def _eager(run_dir: Path):  # noqa: ANN202
    from accel_det.engine.run import open_run

    return open_run(run_dir, "best").model


def _dets(out: tuple[torch.Tensor, ...], i: int) -> dict[str, torch.Tensor]:
    boxes, scores, labels, num = out
    k = int(num[i])
    return {"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k]}


def assert_contract(out: tuple[torch.Tensor, ...], n: int, max_det: int = MAX_DET, k: int = K) -> None:
    boxes, scores, labels, num = out
    assert boxes.shape == (n, max_det, 4) and scores.shape == (n, max_det) and labels.shape == (n, max_det)
    assert num.shape == (n,) and labels.dtype == torch.int64 and num.dtype == torch.int64
    for i in range(n):
        d = int(num[i])
        assert 0 < d <= max_det  # conf_thres 0.01: every test image has detections
        assert ((labels[i, :d] >= 1) & (labels[i, :d] <= k)).all()
        assert (scores[i, :d].diff() <= 0).all()  # sorted
        assert (labels[i, d:] == 0).all() and (scores[i, d:] == 0).all() and (boxes[i, d:] == 0).all()


def assert_batch_independent_and_eager(path: Path, run_dir: Path, x: torch.Tensor) -> None:
    """Batch 4 of different images: each image's rows equal what it gets alone, and the eager model's."""
    exported, model = ExportedDetector(path, device="cpu"), _eager(run_dir)
    together = exported.raw(x)
    assert_contract(together, len(x))
    with torch.no_grad():
        eager = model(x)
    c = compare_batch(eager, [_dets(together, i) for i in range(len(x))], exported.meta["iou_thres"], MAX_DET)
    assert not c.problem, c.problem
    for i in range(len(x)):
        # same graph, same image: the same detections (up to the last bits: kernels differ with the batch size)
        alone = exported.raw(x[i:i + 1])
        assert torch.equal(alone[3][0], together[3][i])
        c = compare_image(_dets(alone, 0), _dets(together, i), exported.meta["iou_thres"], MAX_DET)
        assert not c.problem and c.matched == int(together[3][i]), c.problem
        assert torch.equal(alone[2][0], together[2][i])  # labels, in the same order


def _noise(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, dim, dim, generator=g)


@pytest.mark.parametrize("name, dim", [("faceboxes", 160), ("ssdlite_mobilenet_v3", 96), ("ssdlite_resnet18", 96)])
def test_native_models_onnx_equals_eager(tmp_path: Path, name: str, dim: int) -> None:
    run_dir = make_run(tmp_path, name, dim)
    out = export_run(run_dir)  # checks batch 1 and 4 on the val images itself
    assert out == run_dir / "export" / "final.onnx"
    meta = json.loads((out.with_name("final.onnx.json")).read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"] and meta["img_dim"] == dim
    assert meta["max_det"] == MAX_DET and meta["conf_thres"] == 0.01 and meta["input"]["dynamic_batch"]
    assert meta["normalisation"]["in_graph"] and meta["versions"]["torch"] == torch.__version__
    assert ExportedDetector(out).meta == meta  # the same metadata inside the ONNX file

    import onnx

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels", "num_dets"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert any(node.op_type == "NonMaxSuppression" for node in graph.node)
    assert_batch_independent_and_eager(out, run_dir, _noise(4, dim, seed=1))


def test_dynamic_size_and_pt2_round_trip(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "faceboxes", 160)
    onnx_file = export_run(run_dir, dynamic_size=True, out=tmp_path / "fb.onnx")
    meta = ExportedDetector(onnx_file).meta
    assert meta["input"]["shape"] == ["N", 3, "H", "W"] and meta["input"]["min_side"] == 129
    # another size than the one it was exported and checked at, not square
    x = torch.rand(4, 3, 200, 264, generator=torch.Generator().manual_seed(2))
    assert_batch_independent_and_eager(onnx_file, run_dir, x)
    pt2 = export_run(run_dir, fmt="pt2", dynamic_size=True)
    assert pt2.suffix == ".pt2" and ExportedDetector(pt2).meta["format"] == "pt2"
    assert_batch_independent_and_eager(pt2, run_dir, torch.rand(4, 3, 256, 192, generator=torch.Generator()
                                                                .manual_seed(3)))


def test_fixed_batch_and_overrides(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "faceboxes", 160)
    out = export_run(run_dir, batch="3", out=tmp_path / "b3.onnx", overrides=["eval.max_det=10"])
    exported = ExportedDetector(out)
    assert exported.batch == 3 and exported.meta["max_det"] == 10
    x = _noise(5, 160, seed=4)  # two chunks, the second padded with blank images
    dets = exported(x)
    assert len(dets) == 5 and all(len(d["scores"]) <= 10 for d in dets)
    with torch.no_grad():
        eager = _eager(run_dir)(x)
    for e in eager:  # the eager model at the run's max_det (30): the top 10 must agree
        for key in e:
            e[key] = e[key][:10]
    c = compare_batch(eager, dets, exported.meta["iou_thres"], 10)
    assert not c.problem, c.problem


ZOO_EXPORTABLE = ("tv_ssdlite320_mobilenet_v3_large", "tv_ssd300_vgg16", "tv_retinanet_resnet50_fpn_v2",
                  "tv_fcos_resnet50_fpn")


def test_a_checkpoint_with_ema_exports_the_ema_weights(tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    run_dir = make_run(tmp_path, "faceboxes", 160)
    ckpt = run_dir / "checkpoints" / "epoch_0001"
    ckpt.mkdir(parents=True)
    shutil.copy(run_dir / "recipe.json", ckpt / "recipe.json")
    (ckpt / "trainer_state.json").write_text("{}")
    weights = load_file(run_dir / "model.safetensors")
    shutil.copy(run_dir / "model.safetensors", ckpt / "ema.safetensors")  # the averaged weights
    save_file({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()},
              ckpt / "model.safetensors")  # the raw weights: another model
    (run_dir / "checkpoints" / "last").write_text("epoch_0001\n")
    out = export_run(run_dir, "last")
    assert out.name == "last.onnx"
    meta = ExportedDetector(out).meta
    assert meta["weights"] == str(ckpt / "ema.safetensors") and meta["checkpoint"] == "last"
    # equal to the run's model.safetensors (the EMA's copy), not to the perturbed raw weights
    assert_batch_independent_and_eager(out, run_dir, _noise(4, 160, seed=6))


@pytest.mark.parametrize("name", ZOO_EXPORTABLE)
def test_torchvision_one_stage_models_export(tmp_path: Path, name: str) -> None:
    run_dir = make_run(tmp_path, name, 64, "eval.conf_thres=0.001")
    out = export_run(run_dir)  # its own check: batch 1 and 4 equal eager on the val images
    if name == "tv_ssdlite320_mobilenet_v3_large":  # the light one also on noise, row by row (the others: time)
        assert_batch_independent_and_eager(out, run_dir, _noise(4, 64, seed=5))


def test_unsupported_and_bad_arguments_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from accel_det.cli import main

    def error(argv: list[str], rc: int) -> str:
        assert main([str(a) for a in argv]) == rc
        err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    frcnn = make_run(tmp_path / "a", "tv_fasterrcnn_mobilenet_v3_large_320_fpn", 64)
    line = error(["export", frcnn], 1)
    assert "tv_fasterrcnn_mobilenet_v3_large_320_fpn: cannot be exported: two-stage" in line
    assert not (frcnn / "export").exists()
    ssd = make_run(tmp_path / "b", "tv_ssdlite320_mobilenet_v3_large", 64)
    assert "--dynamic-size is for the native models" in error(["export", ssd, "--dynamic-size"], 1)
    assert "must end in .onnx" in error(["export", ssd, "--out", tmp_path / "x.pt2"], 2)
    assert "--batch 0" in error(["export", ssd, "--batch", "0"], 2)
    assert "--opset is for --format onnx" in error(["export", ssd, "--format", "pt2", "--opset", "17"], 2)
    assert "not a run dir" in error(["export", tmp_path], 2)


def test_a_mismatch_is_an_error_and_the_file_is_set_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = make_run(tmp_path, "faceboxes", 160)
    real = ExportedDetector.__call__

    def drops_one(self: ExportedDetector, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        dets = real(self, images)
        dets[-1] = {k: v[1:] for k, v in dets[-1].items()}  # the best detection of the last image goes missing
        return dets

    monkeypatch.setattr(ExportedDetector, "__call__", drops_one)
    with pytest.raises(ExportError, match="differs from the eager model at batch 1.*has no match in the exported"):
        export_run(run_dir)
    assert not (run_dir / "export" / "final.onnx").exists()
    assert (run_dir / "export" / "final.onnx.mismatch").is_file()


def test_predict_with_the_onnx_equals_predict_with_the_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from accel_det.predict import main

    run_dir = make_run(tmp_path, "faceboxes", 160)
    onnx_file = export_run(run_dir)
    images = next((tmp_path / "data").glob("*/JPEGImages"))
    outs = {}
    for tag, argv in {
        "run": [run_dir, images],
        "checkpoint": [run_dir, images, "--checkpoint", onnx_file],
        "file": [onnx_file, images],
    }.items():
        outs[tag] = tmp_path / f"pred_{tag}"
        assert main([*map(str, argv), "--out", str(outs[tag]), "--conf", "0.05"]) == 0
    ref = json.loads((outs["run"] / "predictions.json").read_text())
    assert sum(len(r["detections"]) for r in ref) > 0
    for tag in ("checkpoint", "file"):
        got = json.loads((outs[tag] / "predictions.json").read_text())
        assert [(r["file"], r["drawn"]) for r in got] == [(r["file"], r["drawn"]) for r in ref]
        assert sorted(p.name for p in outs[tag].glob("*.png")) == sorted(p.name for p in outs["run"].glob("*.png"))
        for a, b in zip(ref, got):  # JSON values are rounded: compare as detections, within the tolerances
            as_dets = [{"boxes": torch.tensor([d["box"] for d in r["detections"]]).reshape(-1, 4),
                        "scores": torch.tensor([d["score"] for d in r["detections"]]),
                        "labels": torch.tensor([d["label"] for d in r["detections"]])} for r in (a, b)]
            c = compare_image(*as_dets, iou_thres=0.5, max_det=MAX_DET)
            assert not c.problem and c.matched == len(a["detections"]), c.problem
    # the file's classes must be the run's: an export of another run is refused
    other = make_run(tmp_path / "other", "faceboxes", 160, "data.class_names=['a','b','c']")
    assert main([str(other), str(images), "--out", str(tmp_path / "p4"), "--checkpoint", str(onnx_file)]) == 1
    assert "exported for classes ['circle', 'square', 'triangle']" in capfd.readouterr().err


def test_every_registered_model_is_exported_or_refused_here() -> None:
    from accel_det.catalog import ANCHOR_FREE_MODELS, KNOWN_MODELS, NATIVE_MODELS

    refused = {"tv_fasterrcnn_mobilenet_v3_large_320_fpn"}  # test_unsupported_and_bad_arguments_are_one_line
    # ANCHOR_FREE_MODELS: tests/test_anchor_free.py test_onnx_export_equals_eager
    assert set(NATIVE_MODELS) | set(ANCHOR_FREE_MODELS) | set(ZOO_EXPORTABLE) | refused == set(KNOWN_MODELS)


def test_compare_accepts_near_ties_only() -> None:
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    a = {"boxes": box, "scores": torch.tensor([0.80000]), "labels": torch.tensor([1])}
    moved = {"boxes": box + 2.0, "scores": torch.tensor([0.80003]), "labels": torch.tensor([1])}
    # overlapping (IoU > 0.5), scores within 1e-4: NMS kept one on one side, the other on the other side
    c = compare_image(a, moved, iou_thres=0.5, max_det=10)
    assert not c.problem and c.swaps == 1
    far = {"boxes": box + 30.0, "scores": torch.tensor([0.80003]), "labels": torch.tensor([1])}
    assert compare_image(a, far, iou_thres=0.5, max_det=10).problem
    other_label = {**a, "labels": torch.tensor([2])}
    assert "has no match" in compare_image(a, other_label, iou_thres=0.5, max_det=10).problem
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert compare_image(a, empty, iou_thres=0.5, max_det=1).cuts == 0  # the other side is not full: a miss
    assert compare_image(a, empty, iou_thres=0.5, max_det=1).problem
