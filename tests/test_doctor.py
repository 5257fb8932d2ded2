"""The data doctor (``accel-det check-data``, issue 17): one generated folder per format (VOC, COCO, YOLO) with
one of each bad-input kind, and the doctor must name each with the right count, severity, action and a file;
``--json`` agrees with the table; exit 0 when training can proceed, 1 when it cannot, 2 for a bad recipe.

Tiny images (40x30), CPU, in process through ``accel_det.cli.main`` except one subprocess run of the console
script (which also checks that the decode gives the same report with 2 worker processes as in process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accel_det.cli import main

CLASSES = ["circle", "square", "triangle"]
Rows = dict[tuple[str, str], tuple[int, list[str]]]

# (kind, action) -> (count, a file name that must be among the finding's files), for the images that
# _bad_images writes: the same in every format
DECODED: dict[tuple[str, str], tuple[int, str]] = {
    ("unreadable_image", "sample replaced"): (2, "trunc.jpg"),
    ("exif_rotated", "rotated"): (1, "rot.jpg"),
    ("mode_converted", "converted"): (3, "deep.png"),
    ("empty_image", "kept as negative"): (1, "empty.png"),
    ("box_clipped", "box clipped"): (1, "clip.png"),
    ("degenerate_box", "box dropped"): (1, "zero.png"),
}


# -- writing the folders ---------------------------------------------------------------------------------------


def _png(path: Path, w: int = 40, h: int = 30, mode: str = "RGB", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    (Image.new(mode, (w, h)) if mode == "I;16" else rgb.convert(mode)).save(path)
    return path


def _bad_images(folder: Path) -> dict[str, tuple[int, int]]:
    """The images every format's bad folder shares: {stem: (width, height) as displayed}."""
    for i in range(2):
        _png(folder / f"ok{i}.png", seed=i)
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    _png(folder / "trunc.jpg", seed=7)  # noise: the scan data, not the header, is what gets cut
    data = (folder / "trunc.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(data[: len(data) // 2])  # the header still reads: only a decode finds it
    rot = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = rot.getexif()
    exif[0x0112] = 6  # stored 40x20, shown (and annotated) 20x40
    rot.save(folder / "rot.jpg", exif=exif)
    for stem, mode in (("gray", "L"), ("rgba", "RGBA"), ("deep", "I;16")):
        _png(folder / f"{stem}.png", mode=mode)
    for stem in ("empty", "clip", "zero"):
        _png(folder / f"{stem}.png")
    stems = ("ok0", "ok1", "junk", "trunc", "gray", "rgba", "deep", "empty", "clip", "zero")
    sizes = dict.fromkeys(stems, (40, 30))
    return {**sizes, "rot": (20, 40)}


def _xml(path: Path, objects: list[tuple[str, tuple[float, ...]]], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
                     f"<ymax>{y2}</ymax></bndbox></object>")  # fmt: skip
    path.write_text("".join(parts) + "</annotation>")


GOOD = ("circle", (3, 4, 20, 25))  # VOC 1-based pixels


def _voc(root: Path) -> None:
    sizes = _bad_images(root / "JPEGImages")
    special = {
        "ok0": [GOOD, ("square", (20, 2, 10, 10))],  # an inverted box: the reader drops the object
        "empty": [],
        "clip": [GOOD, ("square", (31, 21, 50, 40))],  # reaches past the 40x30 image
        # VOC's 1-based inclusive pixels cannot say "zero width"; a box beyond the real image (inside a stale
        # declared size) has no area after the clip just the same
        "zero": [GOOD, ("square", (46, 5, 60, 20))],
        "rot": [("circle", (2, 2, 10, 30))],
    }
    for stem, size in sizes.items():
        _xml(root / f"Annotations/{stem}.xml", special.get(stem, [GOOD]), (80, 60) if stem == "zero" else size)
    _xml(root / "Annotations/missing.xml", [GOOD])  # no image
    _png(root / "JPEGImages/noxml.png")  # no annotation
    (root / "Annotations/malformed.xml").write_text("<annotation><object>")
    (root / "train.txt").write_text("\n".join([*sizes, "missing", "noxml", "malformed"]) + "\n")
    (root / "val.txt").write_text("ok1\n")


def _coco(root: Path) -> None:
    sizes = _bad_images(root)
    _png(root / "dup.png")
    images = [{"id": i, "file_name": f"{s}.{'jpg' if s in ('junk', 'trunc', 'rot') else 'png'}", "width": w,
               "height": h} for i, (s, (w, h)) in enumerate(sizes.items())]  # fmt: skip
    del images[2]["width"]  # junk.jpg: no declared size, so the reader never opens it; the decode finds it
    ids = {s: i for i, s in enumerate(sizes)}
    images += [{"id": 50, "file_name": "gone.png"}, {"id": 60, "file_name": "dup.png"},
               {"id": 60, "file_name": "ok1.png"}]  # fmt: skip
    good = [3, 4, 17, 21]
    anns = [{"image_id": ids[s], "category_id": 1, "bbox": good} for s in sizes if s not in ("empty", "rot")]
    anns += [
        {"image_id": ids["rot"], "category_id": 2, "bbox": [2, 2, 8, 28]},
        {"image_id": ids["ok0"], "category_id": 2, "bbox": [20, 2, -15, 10]},  # inverted
        {"image_id": ids["ok1"], "category_id": 2, "bbox": "2 2 10 10"},  # malformed
        {"image_id": ids["clip"], "category_id": 2, "bbox": [30, 20, 20, 20]},  # partly outside 40x30
        {"image_id": ids["zero"], "category_id": 2, "bbox": [5, 5, 0, 10]},  # zero width
        {"image_id": 60, "category_id": 2, "bbox": [1, 1, 5, 5]},  # of the duplicated id
        {"image_id": 99, "category_id": 2, "bbox": [1, 1, 5, 5]},  # of no image
    ]
    for i, ann in enumerate(anns):
        ann["id"] = i  # the first is id 0
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _yolo(root: Path) -> None:
    sizes = _bad_images(root / "images/train")
    good = "0 0.5 0.5 0.4 0.4\n"
    lines = {
        "ok0": good + "1 0.5 0.5\n",  # too few fields
        "ok1": good + "1 0.5 0.5 -0.005 0.2\n",  # negative width (within the rounding of [0, 1])
        "clip": good + "1 0.995 0.5 0.02 0.2\n",  # x2 = 1.005: rounding slack, clamped at load
        "zero": good + "1 0.5 0.5 0 0.2\n",
    }
    (root / "labels/train").mkdir(parents=True)
    for stem in sizes:
        if stem != "empty":  # no label file: no objects
            (root / f"labels/train/{stem}.txt").write_text(lines.get(stem, good))
    _png(root / "images/train/badlabel.png")
    (root / "labels/train/badlabel.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    names = [p.name for p in sorted((root / "images/train").iterdir())] + ["gone.png"]
    (root / "train.txt").write_text("".join(f"images/train/{n}\n" for n in names))
    _png(root / "images/val/v.png")
    (root / "labels/val").mkdir(parents=True)
    (root / "labels/val/v.txt").write_text(good)


def _recipe(tmp_path: Path, fmt: str, root: Path, train: str, val: str) -> Path:
    path = tmp_path / f"{fmt}.toml"
    path.write_text(f'[data]\nformat = "{fmt}"\nroot = "{root}"\ntrain = "{train}"\nval = "{val}"\n'
                    f"class_names = {json.dumps(CLASSES)}\n")  # fmt: skip
    return path


# -- running it ------------------------------------------------------------------------------------------------


def _doctor(capfd: pytest.CaptureFixture[str], recipe: Path, *args: str, rc: int = 0) -> dict:
    capfd.readouterr()
    code = main(["check-data", str(recipe), "--json", "--workers", "0", *args])
    out, err = capfd.readouterr()
    assert code == rc, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    report = json.loads(out)
    assert report["can_train"] is (rc == 0)
    return report


def _rows(report: dict, split: str) -> Rows:
    rows: Rows = {}
    for f in report["findings"]:
        if f["split"] == split:
            assert (f["kind"], f["action"]) not in rows and f["count"] == len(f["details"]) >= len(f["files"]) >= 1
            rows[(f["kind"], f["action"])] = (f["count"], [Path(p).name for p in f["files"]])
    return rows


def _check(rows: Rows, expected: dict[tuple[str, str], tuple[int, str]]) -> None:
    assert {k: n for k, (n, _) in rows.items()} == {k: n for k, (n, _) in expected.items()}
    for key, (_, name) in expected.items():
        assert any(name in f for f in rows[key][1]), (key, rows[key])


def _severities(report: dict) -> dict[str, str]:
    return {f["kind"] + "/" + f["action"]: f["severity"] for f in report["findings"]}


def test_voc_bad_inputs_named_and_counted(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    root = tmp_path / "voc"
    _voc(root)
    recipe = _recipe(tmp_path, "voc", root, "train.txt", "val.txt")
    report = _doctor(capfd, recipe)
    _check(_rows(report, "train"), {
        **DECODED,
        ("missing_image", "image dropped"): (1, "missing.xml"),
        ("missing_annotation", "image dropped"): (1, "noxml.xml"),
        ("malformed_annotation", "image dropped"): (1, "malformed.xml"),
        ("invalid_box", "object dropped"): (1, "ok0.xml"),
    })  # fmt: skip
    assert _rows(report, "val") == {}
    sev = _severities(report)
    assert sev["unreadable_image/sample replaced"] == sev["missing_image/image dropped"] == "skipped"
    assert sev["mode_converted/converted"] == sev["exif_rotated/rotated"] == sev["box_clipped/box clipped"] == "fixed"
    assert sev["empty_image/kept as negative"] == "info"
    converted = next(f for f in report["findings"] if f["kind"] == "mode_converted")
    assert all(m in converted["description"] for m in ("L: 1", "RGBA: 1", "I;16: 1"))
    assert any("truncated" in d or "trunc.jpg: cannot read image" in d for d in
               next(f for f in report["findings"] if f["kind"] == "unreadable_image")["details"])  # fmt: skip
    # 11 images indexed (3 dropped by the reader), 2 of them undecodable; every readable image has one usable box
    assert report["splits"]["train"] | {"findings": None} == {
        "format": "voc", "source": str(root / "train.txt"), "images": 11, "readable": 9, "objects": 9,
        "findings": None}  # fmt: skip
    assert report["splits"]["val"]["findings"] == {"fatal": 0, "skipped": 0, "fixed": 0, "info": 0}
    assert report["counts"] == {"fatal": 0, "skipped": 7, "fixed": 5, "info": 1}

    # the table says the same: every finding's description, count and first file, one summary line per split
    monkeypatch.setenv("COLUMNS", "400")  # one line per row, whatever the terminal
    capfd.readouterr()
    assert main(["check-data", str(recipe), "--workers", "0"]) == 0
    table = capfd.readouterr().out
    for f in report["findings"]:
        line = next(ln for ln in table.splitlines() if f["description"] in ln and f" {f['action']} " in ln)
        assert f" {f['count']} " in line and f["severity"] in line and Path(f["files"][0]).name in line
    assert f"train (voc, {root / 'train.txt'}): images 11, readable 9, objects 9; problems: 0 fatal, 7 skipped" in table
    assert "val (voc," in table and table.rstrip().endswith("ok: training can proceed")

    # on_bad_sample = "error": the run would stop at the first of them, so each drop is fatal
    strict = _doctor(capfd, recipe, 'data.on_bad_sample="error"', rc=1)
    rows = _rows(strict, "train")
    assert rows[("unreadable_image", "stops the run")][0] == 2 and rows[("invalid_box", "stops the run")][0] == 1
    assert ("box_clipped", "box clipped") in rows and strict["counts"]["fatal"] == 6


def test_coco_bad_inputs_named_and_counted(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "coco"
    _coco(root)
    report = _doctor(capfd, _recipe(tmp_path, "coco", root, "ann.json", "ann.json"))
    coco = {
        ("missing_image", "image dropped"): (1, "gone.png"),
        ("duplicate_image_id", "image dropped"): (2, "ann.json"),
        ("orphan_annotation", "annotation dropped"): (1, "ann.json"),
        ("malformed_annotation", "object dropped"): (1, "ann.json"),
        ("invalid_box", "object dropped"): (1, "ann.json"),
        ("annotation_id_zero", "renumbered by accel_det"): (1, "ann.json"),
    }
    _check(_rows(report, "train"), {**DECODED, **coco})
    zero = next(f for f in report["findings"] if f["kind"] == "annotation_id_zero")
    assert zero["severity"] == "info"
    assert zero["details"] == [f"{root / 'ann.json'}: annotation 0 (image_id 0) has id 0"]
    orphan = next(f for f in report["findings"] if f["kind"] == "orphan_annotation")
    assert "unknown image_id 99" in orphan["details"][0]
    # val reads the same file: an unreadable image is left out of the metric, a degenerate box stays ground truth
    val = dict(DECODED)
    val[("unreadable_image", "left out of eval")] = val.pop(("unreadable_image", "sample replaced"))
    val[("degenerate_box", "kept as ground truth, never matched")] = val.pop(("degenerate_box", "box dropped"))
    _check(_rows(report, "val"), {**val, **coco})
    assert _severities(report)["degenerate_box/kept as ground truth, never matched"] == "info"
    assert report["splits"]["train"]["images"] == 11 and report["splits"]["train"]["readable"] == 9


def test_yolo_bad_inputs_named_and_counted_and_the_same_with_workers(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "yolo"
    _yolo(root)
    recipe = _recipe(tmp_path, "yolo", root, "train.txt", "images/val")
    report = _doctor(capfd, recipe)
    _check(_rows(report, "train"), {
        **DECODED,
        ("missing_image", "image dropped"): (1, "train.txt"),
        ("malformed_annotation", "object dropped"): (1, "ok0.txt"),
        ("malformed_annotation", "image dropped"): (1, "badlabel.txt"),
        ("invalid_box", "object dropped"): (1, "ok1.txt"),
    })  # fmt: skip
    assert _rows(report, "val") == {} and report["splits"]["val"]["objects"] == 1

    # the console script, 2 decoding processes: the very same report
    exe = shutil.which("accel-det")
    assert exe, "the console script accel-det is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([exe, "check-data", str(recipe), "--json", "--workers", "2"], capture_output=True,
                         text=True, timeout=120, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout) == report and "Traceback" not in res.stderr

    # the progress hook sees every image of each split, in process and with a pool
    from accel_det.config_io import load_recipe
    from accel_det.data.doctor import check_data

    for workers in (0, 2):
        seen: list[tuple[str, int, int]] = []
        again = check_data(load_recipe(recipe), workers, progress=lambda *a: seen.append(a))  # noqa: B023
        assert again.to_json(str(recipe)) == report
        assert seen[-1] == ("val", 1, 1) and ("train", 11, 11) in seen and seen[0] == ("train", 0, 11)


def _ok_voc(root: Path, stems: list[str], objects: list[tuple[str, tuple[float, ...]]] | None = None) -> None:
    for i, stem in enumerate(stems):
        _png(root / f"JPEGImages/{stem}.png", seed=i)
        _xml(root / f"Annotations/{stem}.xml", [GOOD] if objects is None else objects)


def _fatal_voc(root: Path) -> tuple[str, str, dict, dict]:
    _ok_voc(root, ["a", "b"])
    _ok_voc(root, ["dog"], [("dog", (2, 2, 10, 10))])
    (root / "train.txt").write_text("a\nb\ndog\n")
    (root / "val.txt").write_text("a\nb\n")
    # the unknown name stops training; the split is still scanned with it ignored, so its other problems show
    return "train.txt", "val.txt", {("unknown_class", "stops the run"): (1, "train.txt"),
                                    ("ignored_class", "object dropped"): (1, "dog.xml"),
                                    ("empty_image", "kept as negative"): (1, "dog.png")}, {}


def _fatal_coco(root: Path) -> tuple[str, str, dict, dict]:
    _png(root / "a.png")
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    anns = [{"id": 1, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]}]  # a category nobody declared
    (root / "ann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": anns,
                                               "categories": cats}))  # fmt: skip
    return ("ann.json", "nowhere.json", {("unknown_class", "stops the run"): (1, "ann.json")},
            {("split_unreadable", "stops the run"): (1, "nowhere.json")})  # fmt: skip


def _fatal_yolo(root: Path) -> tuple[str, str, dict, dict]:
    for split, label in (("train", "5 0.5 0.5 0.2 0.2\n"), ("val", "0 20 15 10 8\n")):  # class 5 of 3; pixels
        _png(root / f"images/{split}/a.png")
        (root / f"labels/{split}").mkdir(parents=True)
        (root / f"labels/{split}/a.txt").write_text(label)
    return ("images/train", "images/val", {("unknown_class", "stops the run"): (1, "train")},
            {("pixel_coordinates", "stops the run"): (1, "a.txt")})  # fmt: skip


@pytest.mark.parametrize("fmt", ["voc", "coco", "yolo"])
def test_fatal_findings_exit_1_and_the_other_split_is_scanned(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], fmt: str
) -> None:
    root = tmp_path / fmt
    train, val, train_rows, val_rows = {"voc": _fatal_voc, "coco": _fatal_coco, "yolo": _fatal_yolo}[fmt](root)
    report = _doctor(capfd, _recipe(tmp_path, fmt, root, train, val), rc=1)
    _check(_rows(report, "train"), train_rows)
    _check(_rows(report, "val"), val_rows)
    assert {f["kind"] for f in report["findings"] if f["severity"] == "fatal"} == {
        kind for kind, action in (*train_rows, *val_rows) if action == "stops the run"}
    if fmt == "voc":  # the val split was indexed and decoded although train is unusable
        assert report["splits"]["val"] | {"findings": None} == {
            "format": "voc", "source": str(root / "val.txt"), "images": 2, "readable": 2, "objects": 2,
            "findings": None}  # fmt: skip
        unknown = report["findings"][0]["details"][0]
        assert "unknown class names dog (1, first in " in unknown and "dog.xml" in unknown


def test_nothing_to_learn_from_is_fatal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "voc"
    _ok_voc(root, ["e0", "e1"], [])
    (root / "JPEGImages/t.jpg").write_bytes(b"junk")
    _xml(root / "Annotations/t.xml", [GOOD])
    (root / "train.txt").write_text("e0\ne1\n")
    (root / "val.txt").write_text("t\n")
    report = _doctor(capfd, _recipe(tmp_path, "voc", root, "train.txt", "val.txt"), rc=1)
    _check(_rows(report, "train"), {("empty_image", "kept as negative"): (2, "e1.png"),
                                    ("no_objects", "stops the run"): (1, "train.txt")})  # fmt: skip
    _check(_rows(report, "val"), {("unreadable_image", "left out of eval"): (1, "t.jpg"),
                                  ("no_objects", "no mAP can be computed"): (1, "val.txt")})  # fmt: skip
    (root / "train.txt").write_text("t\n")
    rows = _rows(_doctor(capfd, _recipe(tmp_path, "voc", root, "train.txt", "val.txt"), rc=1), "train")
    assert rows[("no_readable_images", "stops the run")][0] == 1


def test_bad_recipe_and_arguments_exit_2(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "voc", tmp_path, "train.txt", "val.txt")
    capfd.readouterr()
    assert main(["check-data", str(recipe), "data.formatt='voc'"]) == 2
    assert main(["check-data", str(recipe), "--workers", "-1"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and "data.formatt: unknown key" in err[0] and err[1] == "error: --workers must be >= 0, got -1"
    # the subcommand's module imports no torch: `accel-det --help` stays fast
    code = "import sys; from accel_det.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("fmt", "train", "val"), [("voc", "train.txt", "val.txt"), ("coco", "ann.json", "ann.json"),
                                                   ("yolo", "train.txt", "images/val")])
def test_a_run_on_each_bad_folder_completes_and_counts_what_it_skipped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], fmt: str, train: str, val: str
) -> None:
    root = tmp_path / fmt
    {"voc": _voc, "coco": _coco, "yolo": _yolo}[fmt](root)
    recipe = _recipe(tmp_path, fmt, root, train, val)
    capfd.readouterr()
    code = main(["train", str(recipe), f"output.root='{tmp_path / 'runs'}'", "model.name='faceboxes'",
                 "model.img_dim=128", "data.batch_size=2", "data.num_workers=0", "train.max_epoch=1",
                 "data.augments=[]", "eval.freq=1"])
    out, err = capfd.readouterr()
    assert code == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "warning: " in out  # the readers' per-kind summary lines of what they dropped
    events = [json.loads(x) for x in (tmp_path / "runs/demo/round1/metrics.jsonl").read_text().splitlines()]
    assert [e["count"] for e in events if e["event"] == "bad_samples"]  # unreadable images replaced, counted
    assert [e["event"] for e in events].count("eval") == 1
