"""Plots and report.html: written at the end of training and by ``accel-det report``; the confusion matrix on a
hand-made case; the precision-recall curves against the AP50 the metric reported; metrics.jsonl histories with
resumes and restarts; a failing figure never fails a finished run, but fails the command.

Tiny runs as in tests/test_cli.py: FaceBoxes at 128 px on 24 synthetic 64 px images, trained in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_run import tiny_overrides

from accel_det.metrics.confusion import confusion_matrix
from accel_det.reporting.history import read_history

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"
PNGS = ("results.png", "confusion_matrix.png", "labels.png", "val_predictions.png")


def _main(argv: list[object]) -> int:
    """``accel-det ARGV`` in this process, from a fresh accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    from accel_det.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main([str(a) for a in argv])


def _train(tmp: Path, **over: object) -> Path:
    over = {"output.report": "true", **over}
    assert _main(["train", DEMO, *tiny_overrides(tmp / "runs", tmp / "data", **over)]) == 0
    return tmp / "runs" / "demo" / "round1"


def _check_images(plots: Path, names: tuple[str, ...]) -> None:
    for name in names:
        with Image.open(plots / name) as img:
            img.verify()  # a whole, valid PNG
            assert img.format == "PNG" and min(img.size) > 100, name


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("report"), **{"log.trackers": "['tensorboard']"})


def test_training_writes_plots_page_and_tensorboard_images(trained: Path) -> None:
    plots = trained / "plots"
    _check_images(plots, PNGS)
    page = (trained / "report.html").read_text()
    # self-contained: every figure inline, nothing fetched
    assert page.count('src="data:image/png;base64,') == len(list(plots.glob("*.png")))
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<td>circle</td>" in page and '"name": "faceboxes"' in page  # the per-class table, the recipe
    cm = json.loads((plots / "confusion_matrix.json").read_text())
    assert cm["classes"] == ["circle", "square", "triangle", "background"] and (cm["conf"], cm["iou"]) == (0.25, 0.45)
    m = np.array(cm["matrix"])
    evaluation = json.loads((trained / "eval" / "epoch_0001.json").read_text())
    assert m[:3].sum() == evaluation["num_gt"]  # every ground-truth object is matched or missed, once
    assert "report: " in (trained / "log.txt").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (trained / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {f"report/{Path(n).stem}" for n in PNGS} <= tags


def test_report_command_redraws_from_the_weights(trained: Path, capfd: pytest.CaptureFixture[str]) -> None:
    written = (trained / "plots" / "confusion_matrix.json").read_text()
    for png in (trained / "plots").glob("*.png"):
        png.unlink()
    capfd.readouterr()
    assert _main(["report", trained, "--checkpoint", "last"]) == 0
    assert f"wrote {trained / 'report.html'}" in capfd.readouterr().out
    _check_images(trained / "plots", PNGS)
    # the final weights loaded from their checkpoint predict what the model in memory predicted at the end
    assert (trained / "plots" / "confusion_matrix.json").read_text() == written
    # another operating point
    assert _main(["report", trained, "--checkpoint", "last", "--conf", "0.9", "--iou", "0.7"]) == 0
    cm = json.loads((trained / "plots" / "confusion_matrix.json").read_text())
    assert (cm["conf"], cm["iou"]) == (0.9, 0.7)
    # the final weights file: the evaluation of the last epoch is theirs
    assert _main(["report", trained, "--checkpoint", trained / "model.safetensors"]) == 0
    assert "<td>coco (eval/epoch_0001.json)</td>" in (trained / "report.html").read_text()


def test_pr_curve_area_is_the_reported_ap50(trained: Path) -> None:
    # needs coco_evaluate's "pr50"/"pr50_all" (accel_det/metrics/coco.py)
    result = json.loads((trained / "eval" / "epoch_0001.json").read_text())
    pr = result["pr50"]
    assert len(pr["recall"]) == 101 and pr["recall"][0] == 0 and pr["recall"][-1] == 1
    curves = [np.array(p, dtype=float) for p in pr["precision"].values() if p is not None]
    assert curves and all(len(c) == 101 for c in curves)
    assert np.mean([c.mean() for c in curves]) == pytest.approx(result["AP50"], abs=1e-9)
    assert np.mean(np.array(result["pr50_all"], dtype=float)) == pytest.approx(result["AP50"], abs=1e-9)
    _check_images(trained / "plots", ("pr_curve.png",))


def test_no_evaluation_and_a_failing_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    import accel_det.reporting.plots as plots

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "labels_figure", boom)
    # eval.compute_map = false: no evaluation ever ran, the hook predicts the val split once itself
    run_dir = _train(tmp_path, **{"eval.compute_map": "false"})
    log = (run_dir / "log.txt").read_text()
    assert "warning: report: labels.png failed: RuntimeError: boom" in log
    assert "done: " in log and (run_dir / "model.safetensors").is_file()
    _check_images(run_dir / "plots", ("results.png", "confusion_matrix.png", "val_predictions.png"))
    assert not (run_dir / "plots" / "labels.png").exists() and not list((run_dir / "plots").glob(".*"))
    assert (run_dir / "report.html").is_file()

    # the command does not swallow it
    with pytest.raises(RuntimeError, match="boom"):
        _main(["report", run_dir])
    monkeypatch.undo()

    # a run with no evaluation: the plots that need none, and a note (python -m accel_det.report)
    res = subprocess.run([sys.executable, "-m", "accel_det.report", str(run_dir)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "note: pr_curve.png skipped: these weights have no evaluation yet" in res.stdout
    _check_images(run_dir / "plots", PNGS)

    capfd.readouterr()
    assert _main(["report", tmp_path / "nowhere"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run dir" in err[0]
    assert _main(["report", run_dir, "--iou", "0"]) == 2
    assert "--iou 0.0: must be in (0, 1]" in capfd.readouterr().err


def _rec(gt: list[list[float]], gt_labels: list[int], dets: list[tuple[list[float], float, int]],
         ignore: list[bool] | None = None, image_id: int = 1) -> dict:
    return {
        "image_id": image_id, "height": 100, "width": 100,
        "gt_boxes": np.array(gt, float).reshape(-1, 4), "gt_labels": np.array(gt_labels, np.int64),
        "gt_ignore": np.array(ignore or [False] * len(gt)),
        "boxes": np.array([d[0] for d in dets], float).reshape(-1, 4),
        "scores": np.array([d[1] for d in dets], float), "labels": np.array([d[2] for d in dets], np.int64),
    }  # fmt: skip


def test_confusion_matrix_hand_case() -> None:
    a, b, c = 1, 2, 3
    records = [
        _rec([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [a, b, c], [
            ([0, 0, 10, 10], 0.9, a),  # correct
            ([20, 20, 30, 30], 0.8, c),  # a b taken for a c
            ([60, 60, 70, 70], 0.7, a),  # on nothing: false positive
            ([0, 0, 10, 10], 0.6, b),  # on the a already claimed: one gt per detection, false positive
            ([40, 40, 50, 50], 0.1, c),  # under conf: the c is missed
        ]),
        # greedy by score: the higher-scored b claims the a (IoU 0.67 >= 0.45) although the lower-scored a
        # fits it exactly; an a-box that IoU does not reach (0.4 < 0.45) is not a match
        _rec([[0, 0, 10, 10], [50, 50, 60, 60]], [a, a], [
            ([0, 2, 10, 12], 0.95, b),
            ([0, 0, 10, 10], 0.5, a),
            ([50, 50, 60, 54], 0.5, a),
        ], image_id=2),
        # an ignored (difficult) box: matched by nothing, missed by nobody, and its detection is not counted
        _rec([[0, 0, 10, 10], [30, 30, 40, 40]], [b, c], [([0, 0, 10, 10], 0.9, b)], ignore=[True, False],
             image_id=3),
        _rec([], [], [([0, 0, 5, 5], 0.3, c)], image_id=4),  # no ground truth at all: false positive
    ]
    cm = confusion_matrix(records, ["a", "b", "c"], conf=0.25, iou=0.45)
    #        predicted a  b  c  bg      (rows: truth)
    expected = [[1, 1, 0, 1],  # a: one right, one taken for b, one missed (image 2's small box)
                [0, 0, 1, 0],  # b: taken for c
                [0, 0, 0, 2],  # c: missed twice (under conf; image 3)
                [3, 1, 1, 0]]  # background: a (nothing there), b (duplicate), two a (image 2), c (image 4)
    assert cm.matrix.tolist() == expected
    assert cm.ignored == 1
    norm = cm.normalized()
    assert norm[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3]) and norm[1].tolist() == [0, 0, 1, 0]
    assert cm.to_dict()["classes"] == ["a", "b", "c", "background"]
    # a higher IoU threshold turns image 2's b (IoU 0.67) into a false positive and frees the a for its a
    assert confusion_matrix(records, ["a", "b", "c"], iou=0.7).matrix[0].tolist() == [2, 0, 0, 1]


def test_history_leaves_out_abandoned_events(tmp_path: Path) -> None:
    def train(step: int, epoch: int) -> dict:
        return {"event": "train", "epoch": epoch, "step": step, "loss": float(step), "lr": 0.1, "img_per_s": 1.0}

    def evaluation(epoch: int, ap: float, split: str = "val") -> dict:
        return {"event": "eval", "split": split, "epoch": epoch, "step": epoch * 2, "AP": ap}

    events = [
        train(1, 1), {"event": "restart", "epoch": 0, "step": 0},  # killed before any checkpoint
        train(1, 1), train(2, 1), evaluation(1, 0.1), evaluation(1, 0.3, "val2"), train(3, 2), train(4, 2),
        evaluation(2, 0.5),  # killed before epoch 2's checkpoint: resumed from epoch 1's (step 2)
        {"event": "resume", "epoch": 1, "batch": 0, "step": 2}, evaluation(1, 0.2),  # its hooks ran again
        train(3, 2), train(4, 2), evaluation(2, 0.4),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + '\n{"event": "tra')  # cut short by a kill
    history = read_history(path)
    assert [e["step"] for e in history.train] == [1, 2, 3, 4]
    assert [(e["epoch"], e["AP"]) for e in history.evals["val"]] == [(1, 0.2), (2, 0.4)]
    assert [e["AP"] for e in history.evals["val2"]] == [0.3]
    assert history.dropped_last_line and history.loss_keys() == ["loss"]
    assert history.best("AP")["epoch"] == 2

    path.write_text(json.dumps(train(1, 1)) + "\nnot json\n" + json.dumps(train(2, 1)) + "\n")
    from accel_det.errors import DataError

    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON line"):
        read_history(path)


def test_voc_result_has_no_curve_but_a_note(tmp_path: Path) -> None:
    from accel_det.config_io import load_recipe
    from accel_det.reporting.build import ReportData, write_report

    recipe = load_recipe(DEMO, ["eval.metric='voc07'", f"output.root='{tmp_path}'"])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "epoch": 1, "step": 1, "loss": 1.0}) + "\n")
    result = {"mAP": 0.5, "per_class": {"circle": 0.5, "square": float("nan"), "triangle": 0.5}, "headline": "mAP"}
    data = ReportData(run_dir=tmp_path, recipe=recipe, weights="w", eval_result=result, eval_source="x.json")
    written = write_report(data, strict=True)
    assert any("pr_curve.png skipped: eval.metric = voc07" in n for n in written.notes)
    page = (tmp_path / "report.html").read_text()
    assert "<td>circle</td><td>0.5000</td>" in page and "<td>square</td><td>-</td>" in page
