"""Time to accuracy: accel_det recipes against ultralytics YOLOv8n from scratch, AP50 / AP at fixed wall times.

    OMP_NUM_THREADS=2 python benchmarks/time_to_accuracy.py --sets varied,small --budget-min 15 --marks 5,10,15 \
        --recipe recipes/demo.toml:model.img_dim=320 --peer-imgsz 320 --out-dir runs/tta
    OMP_NUM_THREADS=1 python benchmarks/time_to_accuracy.py --smoke            # 1-minute plumbing check

For each data set (benchmarks/realistic_sets.py, or any VOC folder given as ``--voc NAME=PATH:class,class``) and
each trainer, one budgeted run, one after the other (never two at once):

* accel_det, per ``--recipe path[:override,override]``: ``python -m accel_det.train <recipe> data.format='voc'
  data.root=... data.class_names=[...] train.time_budget_minutes=<budget> eval.freq=1 eval.metric='coco'
  eval.conf_thres=0.001 eval.max_det=100 output.root=<tmp>``. A recipe that sets ``train.max_epoch`` (exclusive
  with the budget) is run from a temp JSON copy without it; the final recipe is validated first, as
  ``accel-det validate`` does. Each evaluation's wall time is its ``eval`` line's ``time`` in metrics.jsonl (the
  eval json file's mtime when a line has none) minus the time this script recorded just before the command.
* the peer: ``/work/peer_venv/bin/python benchmarks/peer_yolo.py`` (YOLOv8n from its yaml, ultralytics' own
  ``time=`` schedule), which records each epoch's wall time from the same start and predicts the val set with
  every epoch's weights after training; "not installed" when that python cannot import ultralytics.

One metric for all: pycocotools ``COCOeval`` (bbox, maxDets 100) on a COCO ground truth built here from the VOC
val XMLs (image_id = position in val.txt, category_id = 1..K in class order, box = the continuous pixel box
accel_det reads, ``iscrowd`` = difficult) scores every evaluation's predictions of both trainers. It is checked
against accel_det's own numbers on the accel_det run's best epoch (``eval/epoch_XXXX.json`` from the same COCO
evaluation; they must agree to 1e-3, else the run is marked and the script exits non-zero).

Reported per run: best-so-far AP50 and best-so-far AP (each its own running maximum) over evaluations finished
by each mark. Output in ``--out-dir``: ``results.json`` (every curve, the check, machine, date, command) and
``results.md`` (the table, ready for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # accel_det from this checkout
import realistic_sets  # noqa: E402  (a sibling script, not a package)

PEER_PYTHON = "/work/peer_venv/bin/python"
ROOT = Path(__file__).resolve().parent.parent
AGREE = 1e-3


@dataclass
class DataSet:
    name: str
    root: Path
    classes: list[str]
    gt: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    dataset: str
    trainer: str  # "accel_det" or "ultralytics"
    label: str  # "trainer, model, settings"
    command: list[str]
    curve: list[dict[str, float]] = field(default_factory=list)  # {"epoch", "time_s", "AP50", "AP"}
    status: str = "ok"
    check: dict[str, Any] | None = None
    log: str = ""


# --- ground truth and scoring --------------------------------------------------------------------------------

def coco_gt(root: Path, classes: list[str]) -> dict[str, Any]:
    """COCO ground truth of the VOC val split, numbered the way accel_det's VOC reader numbers it."""
    ids = [line.split()[0] for line in (root / "ImageSets/Main/val.txt").read_text().splitlines() if line.strip()]
    images, anns = [], []
    for idx, image_id in enumerate(ids):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        xml = ET.parse(xml_path).getroot()
        size = xml.find("size")
        if size is None:
            raise SystemExit(f"{xml_path}: no <size> (needed for the COCO ground truth)")
        images.append({"id": idx, "width": int(float(size.findtext("width", "0"))),
                       "height": int(float(size.findtext("height", "0")))})
        for i, obj in enumerate(xml.findall("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            if name not in classes:
                raise SystemExit(f"{xml_path}: object {i}: class {name!r} not in {classes}")
            bnd = obj.find("bndbox")
            if bnd is None:
                raise SystemExit(f"{xml_path}: object {i}: no <bndbox>")
            xmin, ymin, xmax, ymax = (float(bnd.findtext(t, "nan")) for t in ("xmin", "ymin", "xmax", "ymax"))
            w, h = xmax - xmin + 1, ymax - ymin + 1  # 1-based inclusive -> continuous [xmin - 1, xmax]
            crowd = int(float(obj.findtext("difficult", "0") or 0))
            anns.append({"id": len(anns) + 1, "image_id": idx, "category_id": classes.index(name) + 1,
                         "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h, "iscrowd": crowd})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def score(gt: dict[str, Any], dets: list[dict[str, Any]]) -> tuple[float, float]:
    """(AP50, AP) of COCO-format detections by pycocotools, bbox, its default parameters (maxDets 100)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))  # COCO adds keys to what it indexes
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0), max(float(ev.stats[0]), 0.0)


def best_so_far(curve: list[dict[str, float]], minutes: float) -> tuple[float, float] | None:
    done = [c for c in curve if c["time_s"] <= minutes * 60]
    if not done:
        return None
    return max(c["AP50"] for c in done), max(c["AP"] for c in done)


# --- accel_det ----------------------------------------------------------------------------------------------

def parse_recipe_spec(spec: str) -> tuple[Path, list[str]]:
    """``path[:key=value,key=value]``; a comma splits only before ``key=`` (a value may be a TOML list)."""
    path, _, rest = spec.partition(":")
    return Path(path), [o.strip() for o in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest) if o.strip()]


def accel_det_command(spec: str, ds: DataSet, budget: float, out_root: Path,
                      tmp: Path) -> tuple[list[str], str, int]:
    """The train command of one recipe on one data set, its label and its data.num_workers; the recipe is
    validated here."""
    from accel_det.config_io import apply_overrides, load_recipe

    path, own = parse_recipe_spec(spec)
    try:
        data = tomllib.loads(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--recipe {spec}: cannot read {path}: {exc}") from None
    data = apply_overrides(data, own)
    data.get("train", {}).pop("max_epoch", None)  # exclusive with the budget
    data.get("data", {}).pop("synthetic", None)  # the generated-shapes table has no meaning for a VOC folder
    recipe_path = tmp / f"recipe_{len(list(tmp.glob('recipe_*.json')))}.json"
    recipe_path.write_text(json.dumps(data, indent=2))
    overrides = [
        "data.format='voc'", f"data.root='{ds.root}'", f"data.class_names={json.dumps(ds.classes)}",
        "data.train='ImageSets/Main/train.txt'", "data.val='ImageSets/Main/val.txt'",
        f"train.time_budget_minutes={budget}", "eval.freq=1", "eval.metric='coco'", "eval.conf_thres=0.001",
        "eval.max_det=100", f"output.root='{out_root}'",
    ]
    recipe = load_recipe(recipe_path, overrides)  # what `accel-det validate` checks: fails here, not mid-run
    settings = ", ".join([f"{recipe.model.img_dim}px", f"batch {recipe.data.batch_size}",
                          f"workers {recipe.data.num_workers}", *own])
    label = f"accel_det {path.name}, {recipe.model.name}, {settings}"
    return [sys.executable, "-m", "accel_det.train", str(recipe_path), *overrides], label, recipe.data.num_workers


def accel_det_curve(run: Run, out_root: Path, t0: float, gt: dict[str, Any]) -> None:
    metrics = sorted(out_root.rglob("metrics.jsonl"))
    if len(metrics) != 1:
        run.status = f"expected one metrics.jsonl under {out_root}, found {len(metrics)}"
        return
    run_dir = metrics[0].parent
    own: dict[int, dict[str, Any]] = {}
    for line in metrics[0].read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "eval" and rec.get("split", "val") == "val":
            own[int(rec["epoch"])] = rec
    for epoch in sorted(own):
        pred = run_dir / "eval" / f"predictions_epoch_{epoch:04d}.json"
        when = own[epoch].get("time") or (run_dir / "eval" / f"epoch_{epoch:04d}.json").stat().st_mtime
        ap50, ap = score(gt, json.loads(pred.read_text()))
        run.curve.append({"epoch": epoch, "time_s": round(when - t0, 2), "AP50": ap50, "AP": ap,
                          "own_AP50": float(own[epoch]["AP50"]), "own_AP": float(own[epoch]["AP"])})
    if not run.curve:
        run.status = "no evaluation finished"
        return
    # the check: pycocotools here vs accel_det's own numbers, on the epoch with the highest AP (an all-zero
    # epoch would agree trivially); every other epoch is compared too and the largest gap reported
    best = max(run.curve, key=lambda c: c["AP"])
    gaps = [max(abs(c["AP50"] - c["own_AP50"]), abs(c["AP"] - c["own_AP"])) for c in run.curve]
    run.check = {"epoch": best["epoch"], "pycocotools": {"AP50": best["AP50"], "AP": best["AP"]},
                 "accel_det": {"AP50": best["own_AP50"], "AP": best["own_AP"]},
                 "max_abs_diff_all_epochs": max(gaps), "agree": max(gaps) <= AGREE}
    if max(gaps) > AGREE:
        run.status = f"pycocotools re-score differs from accel_det's own numbers by {max(gaps):.4g}"


# --- the peer -----------------------------------------------------------------------------------------------

def peer_available(python: str) -> bool:
    if not Path(python).is_file():
        return False
    probe = subprocess.run([python, "-c", "import ultralytics"], capture_output=True, timeout=300,
                           env={**os.environ, "YOLO_OFFLINE": "1"})
    return probe.returncode == 0


def peer_curve(run: Run, result: Path, gt: dict[str, Any]) -> None:
    data = json.loads(result.read_text())
    for ep in data["epochs"]:
        ap50, ap = score(gt, ep["predictions"])
        run.curve.append({"epoch": ep["epoch"], "time_s": ep["time_s"], "AP50": ap50, "AP": ap})
    run.label += f" (ultralytics {data['version']})"
    if not run.curve:
        run.status = "no epoch finished"


# --- driver -------------------------------------------------------------------------------------------------

def run_logged(run: Run, log_path: Path, timeout_s: float, pass_t0: bool = False) -> float:
    """Run ``run.command``; returns the start time recorded just before it (``pass_t0``: also appended to the
    command, for a trainer that times itself from it). Output goes to ``log_path``."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {run.dataset}: {run.label}", flush=True)
    run.log = str(log_path)
    with log_path.open("w") as log:
        t0 = time.time()
        if pass_t0:
            run.command = [*run.command, f"{t0:.3f}"]
        print("  " + shlex.join(run.command), flush=True)
        try:
            proc = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.status = f"killed after {timeout_s:.0f} s"
            return t0
    if proc.returncode != 0:
        run.status = f"exit {proc.returncode} (log: {log_path})"
    return t0


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return f"{model}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def table(runs: list[Run], marks: list[float]) -> str:
    head = "| data set | trainer, model, settings | " + " | ".join(f"{m:g} min" for m in marks) + " |"
    lines = [head, "|" + "---|" * (2 + len(marks))]
    for r in runs:
        cells = []
        for m in marks:
            if r.status in ("not installed", "skipped"):
                cells.append(r.status)
                continue
            b = best_so_far(r.curve, m)
            cells.append("-" if b is None else f"{b[0]:.3f} / {b[1]:.3f}")
        note = "" if r.status in ("ok", "not installed", "skipped") else f" ({r.status})"
        lines.append(f"| {r.dataset} | {r.label}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_voc_arg(text: str) -> tuple[str, Path, list[str]]:
    name, _, rest = text.partition("=")
    path, _, classes = rest.rpartition(":")
    if not name or not path or not classes:
        raise SystemExit(f"--voc {text!r}: expected NAME=PATH:class,class")
    return name, Path(path), classes.split(",")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="varied,small", help="generated sets (benchmarks/realistic_sets.py); '' none")
    ap.add_argument("--voc", action="append", default=[], help="another VOC folder: NAME=PATH:class,class")
    ap.add_argument("--data-root", default="data/bench", help="where the generated sets are (re)built")
    ap.add_argument("--num-train", type=int, default=240)
    ap.add_argument("--num-val", type=int, default=60)
    ap.add_argument("--recipe", action="append", default=[], help="path[:override,override]; repeatable "
                    "(default: recipes/demo.toml)")
    ap.add_argument("--budget-min", type=float, default=15.0)
    ap.add_argument("--marks", default="5,10,15", help="minutes at which best-so-far AP50 / AP is reported")
    ap.add_argument("--peer-python", default=PEER_PYTHON)
    ap.add_argument("--peer-imgsz", type=int, default=320)
    ap.add_argument("--peer-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="peer DataLoader workers (default: the first "
                    "recipe's data.num_workers)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out-dir", default=None, help="default runs/time_to_accuracy_<UTC time>")
    ap.add_argument("--smoke", action="store_true", help="1-minute budgets, tiny sets: checks the plumbing")
    args = ap.parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    started = dt.datetime.now(dt.timezone.utc)
    if args.smoke:
        args.budget_min, args.marks, args.num_train, args.num_val = 1.0, "0.5,1", 32, 16
    marks = [float(m) for m in args.marks.split(",")]
    recipes = args.recipe or ["recipes/demo.toml"]
    # absolute: the trainers run in the repo root, whatever this command's working dir
    out_dir = Path(args.out_dir or f"runs/time_to_accuracy_{started:%Y%m%d_%H%M%S}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    sets = [DataSet(n, realistic_sets.build(n, args.data_root, args.num_train, args.num_val).resolve(),
                    list(realistic_sets.CLASSES)) for n in args.sets.split(",") if n]
    sets += [DataSet(n, p.resolve(), c) for n, p, c in map(parse_voc_arg, args.voc)]
    for ds in sets:
        ds.gt = coco_gt(ds.root, ds.classes)
    have_peer = not args.no_peer and peer_available(args.peer_python)
    # a run gets its budget plus time for start-up, the last evaluation and (peer) the after-training predictions
    timeout_s = args.budget_min * 60 * 1.5 + 600

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tta_") as tmp_str:
        tmp = Path(tmp_str)
        workers = args.workers
        for ds in sets:
            for spec in recipes:
                out_root = out_dir / "accel_det" / ds.name / f"recipe{recipes.index(spec)}"
                cmd, label, recipe_workers = accel_det_command(spec, ds, args.budget_min, out_root, tmp)
                workers = recipe_workers if workers is None else workers
                run = Run(ds.name, "accel_det", label, cmd)
                runs.append(run)
                if out_root.exists() and any(out_root.iterdir()):
                    raise SystemExit(f"{out_root}: not empty (a run there would resume); pick another --out-dir")
                out_root.mkdir(parents=True, exist_ok=True)
                t0 = run_logged(run, out_dir / f"accel_det_{ds.name}_{recipes.index(spec)}.log", timeout_s)
                accel_det_curve(run, out_root, t0, ds.gt)
            peer_label = f"ultralytics YOLOv8n (yaml, from scratch), {args.peer_imgsz}px, batch {args.peer_batch}, " \
                         f"workers {workers}, time={args.budget_min:g} min"
            if not have_peer:
                status = "skipped" if args.no_peer else "not installed"
                runs.append(Run(ds.name, "ultralytics", peer_label, [], status=status))
                continue
            result = out_dir / f"peer_{ds.name}.json"
            cmd = [args.peer_python, str(ROOT / "benchmarks/peer_yolo.py"), "--voc", str(ds.root), "--classes",
                   ",".join(ds.classes), "--minutes", f"{args.budget_min:g}", "--imgsz", str(args.peer_imgsz),
                   "--batch", str(args.peer_batch), "--workers", str(workers), "--out", str(result), "--t0"]
            run = Run(ds.name, "ultralytics", peer_label, cmd)
            runs.append(run)
            run_logged(run, out_dir / f"peer_{ds.name}.log", timeout_s, pass_t0=True)  # --t0 <start>
            if result.is_file():
                peer_curve(run, result, ds.gt)
            elif run.status == "ok":
                run.status = "no result file"

    md = table(runs, marks)
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "command": command,
            "budget_min": args.budget_min, "marks_min": marks,
            "sets": {ds.name: {"root": str(ds.root), "classes": ds.classes, "val_images": len(ds.gt["images"]),
                               "val_boxes": len(ds.gt["annotations"])} for ds in sets},
            "metric": "pycocotools COCOeval bbox (maxDets 100) on the VOC val split; best-so-far AP50 / AP",
            "runs": [{"dataset": r.dataset, "trainer": r.trainer, "label": r.label, "status": r.status,
                      "command": shlex.join(r.command), "log": r.log, "check": r.check, "curve": r.curve}
                     for r in runs]}
    (out_dir / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    header = (f"Machine: {info['machine']}. Date: {info['date']}. Budget {args.budget_min:g} min per run, runs one "
              f"after the other. Cells: best-so-far AP50 / AP (pycocotools, COCO 0.5:0.95) over evaluations "
              f"finished by the mark, wall time from each command's start.\n\nCommand: `{command}`\n")
    (out_dir / "results.md").write_text(header + "\n" + md + "\n")
    print(header + "\n" + md)
    for r in runs:
        if r.check is not None:
            print(f"check {r.dataset} {r.label}: {json.dumps(r.check)}")
    print(f"written: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return 0 if all(r.status in ("ok", "not installed", "skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
