"""The peer trainer of benchmarks/time_to_accuracy.py: ultralytics YOLOv8n from scratch on a VOC folder.

Runs only under the peer venv (ultralytics 8.4 with the system torch); time_to_accuracy.py calls it as

    /work/peer_venv/bin/python benchmarks/peer_yolo.py --voc data/bench/varied_train240_val60_seed0_v1 \
        --classes star,cross --minutes 15 --imgsz 320 --workers 1 --t0 <epoch seconds> --out peer.json

What it does, through the public API only (``YOLO(...).train/predict``, ``add_callback``, ``settings``):
1. converts the VOC folder to a YOLO copy in a temp dir (images symlinked, labels cx cy w h normalised) + a data
   yaml;
2. trains ``YOLO("yolov8n.yaml")`` (built from its yaml, ``pretrained=False``: no weights anywhere) with
   ``time=<minutes/60>`` hours, so its own schedule fits the budget, on the CPU; an ``on_fit_epoch_end``
   callback records the wall time since ``--t0`` (the benchmark command's start) and an ``on_model_save``
   callback copies the checkpoint it has just written (its EMA weights) aside per epoch;
3. after training (not counted), predicts the val images with each epoch's weights (conf 0.001, max_det 100,
   NMS IoU 0.7, its default for validation) and writes, per epoch, COCO-format detections in original image
   pixels (image_id = position in val.txt, category_id = class index + 1, as accel_det's VOC reader numbers
   them) and the epoch's wall time to ``--out``.

Nothing may be downloaded (there is no internet, and a download attempt can stall for minutes): the settings
live in a temp ``YOLO_CONFIG_DIR`` with ``sync`` (telemetry) off, ``YOLO_OFFLINE=1``, a local TTF is put there as
the Arial.ttf its label plotting would fetch, ``plots=False`` (no font, no plots), ``amp=False`` (its AMP check
fetches a pretrained model; AMP is off on CPU anyway), ``pretrained=False``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

NMS_IOU = 0.7


def _local_font() -> Path | None:
    """Any TTF on this machine (matplotlib ships DejaVuSans) to stand in for the fonts ultralytics would fetch."""
    for root in ("/usr/share/fonts", sys.prefix, "/usr/lib/python3/dist-packages", "/usr/local/lib"):
        for path in Path(root).rglob("DejaVuSans.ttf"):
            return path
    return None


def _offline_env(config_dir: Path) -> None:
    """Before ultralytics is imported: its settings and font cache in a temp dir, nothing fetched."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    font = _local_font()
    if font is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            shutil.copyfile(font, config_dir / name)


def read_split(voc: Path, split: str) -> list[str]:
    path = voc / "ImageSets" / "Main" / f"{split}.txt"
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"{path}: split file missing") from None


def find_image(voc: Path, image_id: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".webp"):
        path = voc / "JPEGImages" / f"{image_id}{ext}"
        if path.is_file():
            return path
    raise SystemExit(f"{voc / 'JPEGImages'}: no image for id {image_id}")


def voc_boxes(xml_path: Path, classes: list[str]) -> tuple[int, int, list[tuple[int, float, float, float, float]]]:
    """(width, height, [(class index, x0, y0, x1, y1) continuous 0-based px]) of one VOC XML."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise SystemExit(f"{xml_path}: cannot read: {exc}") from None
    size = root.find("size")
    if size is None:
        raise SystemExit(f"{xml_path}: no <size>")
    w, h = int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
    out = []
    for i, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise SystemExit(f"{xml_path}: object {i}: class {name!r} not in --classes {','.join(classes)}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise SystemExit(f"{xml_path}: object {i}: no <bndbox>")
        xmin, ymin, xmax, ymax = (float(bnd.findtext(t, "nan")) for t in ("xmin", "ymin", "xmax", "ymax"))
        # VOC is 1-based inclusive pixels: the same continuous box accel_det's voc.py reads
        out.append((classes.index(name), xmin - 1, ymin - 1, xmax, ymax))
    return w, h, out


def to_yolo(voc: Path, classes: list[str], dest: Path) -> Path:
    """A YOLO-format copy of the VOC train/val splits under ``dest``; returns its data yaml."""
    for split in ("train", "val"):
        (dest / "images" / split).mkdir(parents=True)
        (dest / "labels" / split).mkdir(parents=True)
        for image_id in read_split(voc, split):
            image = find_image(voc, image_id)
            w, h, boxes = voc_boxes(voc / "Annotations" / f"{image_id}.xml", classes)
            (dest / "images" / split / image.name).symlink_to(image.resolve())
            lines = [f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
                     for c, x0, y0, x1, y1 in boxes]
            (dest / "labels" / split / f"{image.stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    names = "".join(f"  {i}: {json.dumps(n)}\n" for i, n in enumerate(classes))
    yaml = dest / "data.yaml"
    yaml.write_text(f"path: {dest}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="ultralytics YOLOv8n from scratch on a VOC folder, per-epoch val "
                                 "predictions with wall times")
    ap.add_argument("--voc", required=True, type=Path)
    ap.add_argument("--classes", required=True, help="comma-separated, in accel_det's data.class_names order")
    ap.add_argument("--minutes", required=True, type=float, help="training budget (ultralytics' time=, in hours)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t0", type=float, default=None, help="time.time() at the benchmark command's start")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    t0 = time.time() if args.t0 is None else args.t0
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]

    with tempfile.TemporaryDirectory(prefix="peer_yolo_") as tmp_str:
        tmp = Path(tmp_str)
        _offline_env(tmp / "config")
        import torch
        import ultralytics
        from ultralytics import YOLO, settings

        settings.update({"sync": False})
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        data_yaml = to_yolo(args.voc, classes, tmp / "yolo_data")
        keep = tmp / "epochs"
        keep.mkdir()
        times: dict[int, float] = {}

        def on_fit_epoch_end(trainer: Any) -> None:
            times[int(trainer.epoch) + 1] = time.time() - t0

        def on_model_save(trainer: Any) -> None:
            shutil.copyfile(trainer.last, keep / f"epoch_{int(trainer.epoch) + 1:04d}.pt")

        model = YOLO("yolov8n.yaml")
        model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
        model.add_callback("on_model_save", on_model_save)
        train_args = dict(data=str(data_yaml), imgsz=args.imgsz, time=args.minutes / 60, epochs=1000,
                          batch=args.batch, workers=args.workers, device="cpu", pretrained=False, amp=False,
                          plots=False, seed=args.seed, project=str(tmp / "runs"), name="train", exist_ok=True,
                          verbose=False)
        model.train(**train_args)
        train_end = time.time() - t0

        val_ids = read_split(args.voc, "val")
        val_paths = [str(find_image(args.voc, i)) for i in val_ids]
        epochs = []
        for ckpt in sorted(keep.glob("epoch_*.pt")):
            epoch = int(ckpt.stem.split("_")[1])
            if epoch not in times:
                continue  # saved but its epoch did not finish (should not happen)
            dets = []
            for idx, res in enumerate(YOLO(str(ckpt)).predict(
                    source=val_paths, imgsz=args.imgsz, conf=0.001, iou=NMS_IOU, max_det=100, device="cpu",
                    verbose=False, stream=True)):
                xyxy = res.boxes.xyxy.cpu().tolist()  # original image pixels
                for (x0, y0, x1, y1), score, cls in zip(xyxy, res.boxes.conf.cpu().tolist(),
                                                        res.boxes.cls.cpu().tolist(), strict=True):
                    dets.append({"image_id": idx, "category_id": int(cls) + 1, "score": float(score),
                                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
            epochs.append({"epoch": epoch, "time_s": round(times[epoch], 3), "predictions": dets})
        result = {"trainer": "ultralytics", "version": ultralytics.__version__, "torch": torch.__version__,
                  "model": "yolov8n (from yolov8n.yaml, no pretrained weights)",
                  "settings": {k: v for k, v in train_args.items() if k not in ("data", "project", "name")},
                  "nms_iou": NMS_IOU, "train_end_s": round(train_end, 3), "epochs": epochs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result) + "\n")
        print(f"{args.out}: {len(epochs)} epoch(s), training ended at {train_end:.1f} s")


if __name__ == "__main__":
    main()
