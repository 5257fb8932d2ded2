"""``predict`` through its DataLoader: results in input order whatever the batch and worker count, images of
different sizes and modes in one batch mapped back to their own pixels, an unreadable file in the middle
reported at its place while the others are predicted, the same bytes read in process or by 2 workers and drawn
by 1 or 2 threads, ``--no-draw``, predictions.json as json.dumps writes it, and the errors as one line.

No trained model: ``open_run`` is replaced by a stub whose one detection per image has the image's mean pixel
value as its score, so a result that landed at another file's place shows in its score.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.errors import DataError, UsageError

DIM = 64


class _MeanScore(nn.Module):
    """One box over the top-left quarter of the input square, scored with the image's mean value in [0, 1]."""

    def forward(self, images: torch.Tensor, targets: Any = None) -> list[dict[str, torch.Tensor]]:
        n, _, h, w = images.shape
        box = torch.tensor([[0.0, 0.0, w / 2, h / 2]])
        return [{"boxes": box, "scores": images[i].mean().reshape(1), "labels": torch.tensor([2])} for i in range(n)]


@pytest.fixture
def stub_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``configure(*overrides)`` makes ``open_run`` return the stub model with the recipe of these overrides."""
    import accel_det.engine.run as run_module
    from accel_det.engine.run import OpenedRun, Weights

    def configure(*overrides: str) -> Path:
        recipe = load_recipe(None, [f"model.img_dim={DIM}", *overrides])
        opened = OpenedRun(tmp_path, recipe, Weights(tmp_path / "w.safetensors", "final"), _MeanScore())
        monkeypatch.setattr(run_module, "open_run", lambda *args, **kwargs: opened)
        return tmp_path

    return configure


# (name, size (w, h), mode, grey value): solid images, so the model input's mean is the value whatever the resize
IMAGES = [
    ("a.jpg", (64, 64), "RGB", 20),
    ("b.png", (200, 100), "L", 60),
    ("c.png", (30, 90), "RGBA", 100),
    ("d/e.png", (128, 72), "RGB", 140),
    ("f.png", (77, 77), "L", 180),
    ("g.png", (96, 40), "RGB", 220),
]


def _write_images(folder: Path) -> None:
    for name, size, mode, value in IMAGES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fill: Any = value if mode == "L" else (value, value, value, 255)[: len(mode)]
        Image.new(mode, size, fill).save(path, quality=100)  # quality: JPEG only; a solid block survives it exactly
    (folder / "c2_bad.png").write_bytes(b"not an image")  # sorts in the middle, in the first batch


def _predict(run_dir: Path, folder: Path, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    from accel_det.predict import predict

    with pytest.raises(DataError, match=r"1 of 7 images could not be read .*c2_bad\.png"):
        predict(run_dir, [str(folder)], out, conf=0.0, batch_size=3, **kwargs)
    return json.loads((out / "predictions.json").read_text())


def test_results_in_input_order_mapped_back_and_workers_draw_the_same_files(
        stub_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = stub_run()
    folder = tmp_path / "images"
    _write_images(folder)
    inline = _predict(run_dir, folder, tmp_path / "inline", workers=0)
    assert capsys.readouterr().out.count("warning: skipped ") == 1
    names = [Path(r["file"]).relative_to(folder).as_posix() for r in inline]
    assert names == ["a.jpg", "b.png", "c.png", "c2_bad.png", "d/e.png", "f.png", "g.png"]  # input order
    bad = inline[3]
    assert set(bad) == {"file", "error"} and "c2_bad.png: cannot read image" in bad["error"]
    for r, (name, (w, h), _, value) in zip([*inline[:3], *inline[4:]], IMAGES):
        (det,) = r["detections"]
        assert r["file"] == str(folder / name)
        assert (r["width"], r["height"]) == (w, h)
        assert det["score"] == pytest.approx(value / 255, abs=1e-4)  # this image's own result
        assert det["box"] == [0.0, 0.0, round(w / 2, 2), round(h / 2, 2)]  # back in the image's pixels
        assert det["class_name"] == "square"
        with Image.open(tmp_path / "inline" / r["drawn"]) as im:
            assert im.size == (w, h) and im.mode == "RGB"
    # two reader processes and two drawing threads (above: none and one): the same JSON and PNG bytes
    pooled = _predict(run_dir, folder, tmp_path / "pooled", workers=2)
    assert pooled == inline
    for r in pooled[:3] + pooled[4:]:
        assert filecmp.cmp(tmp_path / "inline" / r["drawn"], tmp_path / "pooled" / r["drawn"], shallow=False)
    # --no-draw: the same predictions, no PNG, no "drawn" entry
    json_only = _predict(run_dir, folder, tmp_path / "json_only", workers=2, draw=False)
    assert json_only == [{k: v for k, v in r.items() if k != "drawn"} for r in inline]
    assert list((tmp_path / "json_only").rglob("*.png")) == []


def test_gray_model_and_letterbox_through_the_command_line(stub_run: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from accel_det.predict import main

    run_dir = stub_run("model.channels=1", "data.letterbox=true")
    Image.new("RGB", (200, 100), (90, 90, 90)).save(tmp_path / "wide.png")
    Image.new("L", (50, 100), 30).save(tmp_path / "tall.png")
    out = tmp_path / "out"
    argv = [str(run_dir), str(tmp_path / "wide.png"), str(tmp_path / "tall.png"), "--out", str(out), "--conf", "0"]
    assert main([*argv, "--workers", "1", "--batch-size", "2"]) == 0
    assert "2 images, 2 detections >= 0.0" in capsys.readouterr().out
    wide, tall = json.loads((out / "predictions.json").read_text())
    # letterboxed: the mean colour pads the square, so the score is not the image's value alone
    assert wide["detections"][0]["score"] != pytest.approx(90 / 255, abs=1e-3)
    # the top-left quarter of the square, mapped back through the padding: 200x100 -> 64x32 at 16 px down
    assert wide["detections"][0]["box"] == [0.0, 0.0, 100.0, 50.0]
    with Image.open(out / tall["drawn"]) as im:  # a gray model's image is drawn in colour, at its own size
        assert im.size == (50, 100) and im.mode == "RGB"
        assert np.asarray(im)[-1, -1].tolist() == [30, 30, 30]
    assert main([*argv, "--no-draw", "--workers", "0", "--out", str(tmp_path / "nd")]) == 0
    assert "drawn" not in json.loads((tmp_path / "nd" / "predictions.json").read_text())[0]


def test_bad_arguments_and_an_unwritable_drawing_are_one_line(stub_run: Any, tmp_path: Path) -> None:
    from accel_det.predict import predict

    run_dir = stub_run()
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    with pytest.raises(UsageError, match=r"--workers -1: must be >= 0"):
        predict(run_dir, [str(tmp_path / "x.png")], tmp_path / "out", workers=-1)
    with pytest.raises(UsageError, match=r"--batch-size 0: must be > 0"):
        predict(run_dir, [str(tmp_path / "x.png")], tmp_path / "out", batch_size=0)
    (tmp_path / "out" / "x.png").mkdir(parents=True)  # a folder where the drawing goes
    for workers in (0, 1):
        with pytest.raises(DataError, match=r"out/x\.png: cannot write the drawn image"):
            predict(run_dir, [str(tmp_path / "x.png")], tmp_path / "out", workers=workers)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]  # no temp file left behind


def test_predictions_json_is_what_json_dumps_writes() -> None:
    from accel_det.jsonio import strict_json
    from accel_det.predict_io import predictions_json

    det = {"box": [0.0, -0.0, 12.34, 1e16], "score": 0.1235, "label": 2, "class_name": "square"}
    odd = {"box": [float("nan"), float("inf"), -float("inf"), 5e-324], "score": 1e-05, "label": 1,
           "class_name": 'caf\u00e9 "\u732b"\\'}
    entries = [
        {"file": "/a/x.jpg", "width": 3, "height": 4, "drawn": "x.png", "detections": [det, odd]},
        {"file": '/a/\u00e9 "q"\\\n.png', "error": "cannot read image: \u00fc\tline"},
        {"file": "/a/y.png", "width": 1, "height": 2, "detections": []},
        {"file": "/a/z.png", "width": 1, "height": 2, "detections": [det]},
    ]
    for case in (entries, entries[1:2], entries[2:], []):
        assert predictions_json(case) == json.dumps(strict_json(case), indent=2, default=str) + "\n"
