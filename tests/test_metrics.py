"""accel_det.metrics: COCO on both backends, hand-computed COCO and VOC numbers, edge cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

from accel_det.metrics import coco as coco_mod
from accel_det.metrics import (
    coco_evaluate,
    coco_results,
    evaluate_records,
    metrics_table,
    voc_evaluate,
)
from accel_det.metrics.coco import BACKENDS, build_coco, coco_ground_truth, run_cocoeval, summarize

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
NAMES = ["cat", "dog", "bird"]


def _backend(name: str) -> str:
    pytest.importorskip(name)
    return name


backends = pytest.mark.parametrize("backend", BACKENDS)


def record(image_id, gt=(), gt_labels=(), gt_ignore=None, boxes=(), scores=(), labels=(), hw=(480, 640)):
    gt_labels = np.asarray(gt_labels, dtype=np.int64)
    return {
        "image_id": image_id,
        "height": hw[0],
        "width": hw[1],
        "gt_boxes": np.asarray(gt, dtype=np.float64).reshape(-1, 4),
        "gt_labels": gt_labels,
        "gt_ignore": np.zeros(len(gt_labels), bool) if gt_ignore is None else np.asarray(gt_ignore, bool),
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def generated(num_images: int = 50, num_classes: int = 3, seed: int = 0) -> list[dict]:
    """Random gt of all sizes, noisy/partial/relabelled detections plus clutter; some iscrowd gt, every
    7th image without gt, every 5th without detections, non-contiguous image ids."""
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    recs = []
    for i in range(num_images):
        ng = 0 if i % 7 == 0 else int(rng.integers(1, 8))
        xy = rng.uniform(0, [w - 20, h - 20], (ng, 2))
        gt = np.concatenate([xy, np.minimum(xy + rng.uniform(4, 200, (ng, 2)), [w, h])], axis=1)
        gl = rng.integers(1, num_classes + 1, ng)
        crowd = rng.random(ng) < 0.1
        found = rng.random(ng) < 0.8
        det = gt[found] + rng.normal(0, 6, (int(found.sum()), 4))
        dl = gl[found].copy()
        dl[rng.random(len(dl)) < 0.1] = rng.integers(1, num_classes + 1)
        nf = int(rng.integers(0, 10))
        fxy = rng.uniform(0, [w - 20, h - 20], (nf, 2))
        clutter = np.concatenate([fxy, fxy + rng.uniform(4, 150, (nf, 2))], axis=1)
        boxes = np.concatenate([det, clutter])
        labels = np.concatenate([dl, rng.integers(1, num_classes + 1, nf)])
        scores = rng.random(len(boxes))
        if i % 5 == 0:
            boxes, labels, scores = boxes[:0], labels[:0], scores[:0]
        recs.append(record(3 * i + 1, gt, gl, crowd, boxes, scores, labels, hw=(h, w)))
    return recs


# ---------------------------------------------------------------------------------------------------------
# COCO: the two backends agree, and agree with their own summarize()


@pytest.mark.parametrize("max_det", [100, 300, 10, 3])
def test_coco_backends_agree(max_det: int) -> None:
    recs = generated()
    fast = coco_evaluate(recs, NAMES, backend=_backend("faster_coco_eval"), max_det=max_det)
    ref = coco_evaluate(recs, NAMES, backend=_backend("pycocotools"), max_det=max_det)
    keys = [*STATS[:8], f"AR{max_det}", *STATS[9:]]
    if max_det < 10:  # at most max_det detections per image and class are scored
        assert ref["AR10"] == ref[f"AR{max_det}"]
    assert 0.05 < ref["AP"] < 0.9  # a case where the numbers mean something
    for k in keys:
        assert fast[k] == pytest.approx(ref[k], abs=1e-6), k
    for name in NAMES:
        for k in ("AP", "AP50"):
            assert fast["per_class"][name][k] == pytest.approx(ref["per_class"][name][k], abs=1e-6)
    assert (fast["backend"], ref["backend"]) == ("faster_coco_eval", "pycocotools")
    assert fast["num_detections"] == ref["num_detections"] == sum(len(r["scores"]) for r in recs)


def test_coco_backends_agree_with_tied_scores() -> None:
    recs = generated(seed=3)
    for r in recs:
        r["scores"] = np.round(r["scores"], 1)  # many ties: both must break them the same (stable) way
    fast = coco_evaluate(recs, NAMES, backend=_backend("faster_coco_eval"))
    ref = coco_evaluate(recs, NAMES, backend=_backend("pycocotools"))
    assert [fast[k] for k in STATS] == pytest.approx([ref[k] for k in STATS], abs=1e-6)


@backends
def test_summarize_equals_backend_stats(backend: str) -> None:
    """Our summary (which works for any max_det) equals the backend's summarize() at maxDets=[1,10,100]."""
    recs = generated(seed=1)
    ev = run_cocoeval(
        *build_coco(coco_ground_truth(recs, NAMES), coco_results(recs, [1, 2, 3]), _backend(backend)),
        backend,
        100,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    assert list(summarize(ev, 100).values()) == pytest.approx(list(np.asarray(ev.stats)[:12]), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# COCO: hand-built cases

# Two images, one 50x50 gt each (area 2500: "medium"). COCO samples precision at 101 recall thresholds
# 0, 0.01, ..., 1 and takes the best precision at recall >= r (0 where the curve never reaches r).
G1, G2 = [10, 10, 60, 60], [100, 100, 150, 150]


@backends
def test_coco_perfect(backend: str) -> None:
    recs = [
        record(1, [G1], [1], boxes=[G1], scores=[0.9], labels=[1]),
        record(2, [G2], [1], boxes=[G2], scores=[0.8], labels=[1]),
    ]
    r = coco_evaluate(recs, ["cat"], backend=_backend(backend))
    for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100", "ARm"):
        assert r[k] == pytest.approx(1.0, abs=1e-12), k
    for k in ("APs", "APl", "ARs", "ARl"):  # no gt of that size: COCO's -1
        assert r[k] == -1.0, k
    assert r["per_class"]["cat"] == pytest.approx({"AP": 1.0, "AP50": 1.0}, abs=1e-12)


@backends
def test_coco_one_found_one_missed(backend: str) -> None:
    # One TP, the other gt missed: the curve is the single point (recall 0.5, precision 1). Recall
    # thresholds 0..0.50 (51 of 101) get precision 1, the rest 0, at every IoU threshold: AP = 51/101.
    # A crowd (gt_ignore) region with a higher-scoring detection inside it must change nothing: the
    # detection matches the crowd (IoU = intersection / det area = 1) and is neither TP nor FP.
    # (Not `==`: pycocotools computes precision as tp / (tp + fp + np.spacing(1)), so its 1/1 is 1 - 2**-52
    # and its AP is 51/101 to within 1e-16; faster-coco-eval gives 51/101 exactly.)
    crowd = [200, 200, 400, 400]
    recs = [
        record(1, [G1], [1], boxes=[G1], scores=[0.9], labels=[1]),
        record(
            2, [G2, crowd], [1, 1], [False, True], boxes=[[210, 210, 260, 260]], scores=[0.99], labels=[1]
        ),
    ]
    r = coco_evaluate(recs, ["cat"], backend=_backend(backend))
    for k in ("AP", "AP50", "AP75", "APm"):
        assert r[k] == pytest.approx(51 / 101, abs=1e-12), k
    for k in ("AR1", "AR10", "AR100", "ARm"):
        assert r[k] == 0.5, k
    assert r["APs"] == r["APl"] == -1.0
    assert r["num_gt"] == 2


@backends
def test_coco_false_positive_ranked_first(backend: str) -> None:
    # FP (0.95) before the TP (0.9): points (recall 0, precision 0), (0.5, 0.5). The precision envelope
    # makes both 0.5, so recall thresholds 0..0.50 get 0.5: AP = 51 * 0.5 / 101.
    recs = [
        record(1, [G1], [1], boxes=[G1], scores=[0.9], labels=[1]),
        record(2, [G2], [1], boxes=[[300, 300, 350, 350]], scores=[0.95], labels=[1]),
    ]
    r = coco_evaluate(recs, ["cat", "dog"], backend=_backend(backend))
    assert r["AP"] == pytest.approx(25.5 / 101, abs=1e-12)
    assert r["AP50"] == pytest.approx(25.5 / 101, abs=1e-12)
    assert r["AR100"] == 0.5
    assert np.isnan(r["per_class"]["dog"]["AP"])  # no dog gt: left out, not 0


@backends
def test_coco_no_detections(backend: str) -> None:
    recs = [record(1, [G1], [1]), record(2, [G2], [2]), record(3)]
    r = coco_evaluate(recs, ["cat", "dog"], backend=_backend(backend))
    assert r["num_detections"] == 0 and r["num_images"] == 3
    for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100", "ARm"):
        assert r[k] == 0.0, k
    for k in ("APs", "APl", "ARs", "ARl"):  # still -1 where there is no gt, as COCO gives
        assert r[k] == -1.0, k
    assert r["per_class"]["cat"] == {"AP": 0.0, "AP50": 0.0}
    assert voc_evaluate(recs, ["cat", "dog"], use_07_metric=False)["mAP"] == 0.0


@backends
def test_coco_no_records(backend: str) -> None:
    r = coco_evaluate([], NAMES, backend=_backend(backend))
    assert r["num_images"] == r["num_gt"] == r["num_detections"] == 0
    assert all(r[k] == -1.0 for k in STATS) and r["pr50_all"] == [None] * 101


def test_coco_result_is_plain_json() -> None:
    r = evaluate_records(generated(num_images=10), NAMES, metric="coco", backend="auto")
    assert r["headline"] == "AP" and r["backend"] in BACKENDS
    assert all(type(r[k]) is float for k in STATS)
    assert all(type(v) is float for pc in r["per_class"].values() for v in pc.values())
    assert json.loads(json.dumps(r))["AP"] == r["AP"]


def test_coco_bad_input() -> None:
    with pytest.raises(ValueError, match="backend"):
        coco_evaluate(generated(5), NAMES, backend="detectron")
    with pytest.raises(ValueError, match="1..3"):
        coco_evaluate([record(1, [G1], [1], boxes=[G1], scores=[1.0], labels=[0])], NAMES)
    with pytest.raises(ValueError, match="twice"):
        coco_evaluate([record(1), record(1)], NAMES)
    with pytest.raises(ValueError, match="metric"):
        evaluate_records([record(1)], NAMES, metric="map50")


# ---------------------------------------------------------------------------------------------------------
# coco_results


def test_coco_results_format_and_round_trip() -> None:
    category_ids = [1, 7, 90]  # COCO-style ids with gaps
    recs = [
        record(5, [G1], [1], boxes=[[10.123, 20.5, 30.789, 40.25], G1], scores=[0.5, 0.25], labels=[3, 1]),
        record(9, [G2], [2], boxes=[G2], scores=[0.75], labels=[2]),
        record(11),
    ]
    res = coco_results(recs, category_ids)
    assert res[0] == {"image_id": 5, "category_id": 90, "bbox": [10.12, 20.5, 20.67, 19.75], "score": 0.5}
    assert [(d["image_id"], d["category_id"]) for d in res] == [(5, 90), (5, 1), (9, 7)]
    assert all(type(d["image_id"]) is int and type(d["category_id"]) is int for d in res)
    # back to labels and xyxy
    for d, (box, label) in zip(
        res, [(recs[0]["boxes"][0], 3), (recs[0]["boxes"][1], 1), (G2, 2)], strict=True
    ):
        x, y, w, h = d["bbox"]
        assert np.allclose([x, y, x + w, y + h], box, atol=0.01)
        assert category_ids.index(d["category_id"]) + 1 == label

    # Offline evaluation of the exported JSON (dataset category ids) equals coco_evaluate's numbers.
    pycoco = pytest.importorskip("pycocotools.cocoeval")
    gen = generated(seed=2)
    gt, dt = build_coco(
        coco_ground_truth(gen, NAMES, category_ids),
        json.loads(json.dumps(coco_results(gen, category_ids))),
        "pycocotools",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ev = pycoco.COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = coco_evaluate(gen, NAMES, backend="auto")
    assert [ours[k] for k in STATS] == pytest.approx(list(ev.stats[:12]), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------
# COCO: faster-coco-eval driven from arrays == its public API == pycocotools, array for array


def _eval_arrays(ev) -> dict[str, np.ndarray]:
    return {k: np.asarray(ev.eval[k]) for k in ("precision", "recall", "scores")}


def _ours(recs: list[dict], backend: str, max_det: int):
    f = coco_mod._flatten(recs, len(NAMES))
    return coco_mod._evaluate(coco_mod._gt_index(f, NAMES, cache=False), f, backend, max_det)


@pytest.mark.parametrize("max_det", [100, 10, 3, 1])
@pytest.mark.parametrize("seed", [0, 3])
def test_fce_from_arrays_equals_its_public_api_and_pycocotools(max_det: int, seed: int) -> None:
    _backend("faster_coco_eval")
    recs = generated(80, seed=seed)
    if seed == 3:
        for r in recs:  # ties: the array path must order them as the backends' stable sorts do
            r["scores"] = np.round(r["scores"], 1)
    ours = _ours(recs, "faster_coco_eval", max_det)
    public = run_cocoeval(
        *build_coco(coco_ground_truth(recs, NAMES), coco_results(recs, [1, 2, 3]), "faster_coco_eval"),
        "faster_coco_eval",
        max_det,
    )
    for k, v in _eval_arrays(public).items():
        assert np.array_equal(_eval_arrays(ours)[k], v), k
    assert ours.eval["matched"] == public.eval["matched"]  # the same detection <-> gt pairs, same IoU
    assert ours.params.maxDets == public.params.maxDets == coco_mod._max_dets(max_det)
    ref = _eval_arrays(_ours(recs, _backend("pycocotools"), max_det))
    assert np.array_equal(_eval_arrays(ours)["recall"], ref["recall"])
    # pycocotools' precision is tp / (tp + fp + eps): equal to faster-coco-eval's to within 1e-15
    assert np.allclose(_eval_arrays(ours)["precision"], ref["precision"], rtol=0, atol=1e-12)


def test_fce_without_array_entry_points_falls_back_to_its_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    _backend("faster_coco_eval")
    recs = generated(seed=5)
    direct = coco_evaluate(recs, NAMES, backend="faster_coco_eval", cache_gt=False)
    monkeypatch.setattr(coco_mod, "_fce_core", lambda: None)
    fallback = coco_evaluate(recs, NAMES, backend="faster_coco_eval", cache_gt=False)
    assert json.dumps(fallback, sort_keys=True) == json.dumps(direct, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# COCO: the gt cache


def _snapshot(index) -> object:
    """Everything a cached gt index holds that an evaluation could write to: the annotation dicts the
    backends read (pycocotools' "_ignore" is its per-area-range scratch, rewritten before every read)."""
    if index._pycoco is not None:
        anns = [{k: v for k, v in a.items() if k != "_ignore"} for a in index._pycoco.dataset["annotations"]]
        return copy.deepcopy([anns, index._pycoco.dataset["images"], index._pycoco.dataset["categories"]])
    dump = index.fce_dataset().make_tuple()
    return copy.deepcopy([dump[0], sorted((i, c, a) for i, c, a in dump[1]), index._fce_anns])


def _with_detections_of(recs: list[dict], other: list[dict]) -> list[dict]:
    return [{**r, **{k: o[k] for k in ("boxes", "scores", "labels")}} for r, o in zip(recs, other, strict=True)]


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # exact, nan included


@backends
def test_gt_cache_gives_identical_results_and_is_not_written_to(backend: str) -> None:
    _backend(backend)
    coco_mod.clear_gt_cache()
    recs = generated(seed=6)
    recs2 = _with_detections_of(recs, generated(seed=7))  # the same val set, another model's detections
    uncached = [coco_evaluate(r, NAMES, backend=backend, cache_gt=False) for r in (recs, recs2)]
    first = coco_evaluate(recs, NAMES, backend=backend)
    assert len(coco_mod._GT_CACHE) == 1
    (index,) = coco_mod._GT_CACHE.values()
    before = _snapshot(index)
    second = coco_evaluate(recs2, NAMES, backend=backend)
    third = coco_evaluate(recs, NAMES, backend=backend)
    assert len(coco_mod._GT_CACHE) == 1 and next(iter(coco_mod._GT_CACHE.values())) is index  # served from cache
    assert _snapshot(index) == before
    assert _same(first, uncached[0]) and _same(third, uncached[0]) and _same(second, uncached[1])
    assert not _same(first, second)  # the detections differ: a case where reusing a result would show


@backends
def test_gt_cache_key_follows_the_ground_truth(backend: str) -> None:
    """Any change to the gt (a box, a label, a crowd flag, an image size, the class names) is a new val set;
    the cache stays bounded."""
    _backend(backend)
    coco_mod.clear_gt_cache()
    recs = generated(seed=8)
    coco_evaluate(recs, NAMES, backend=backend)

    def changed(i: int, **kw: object) -> list[dict]:
        out = [dict(r) for r in recs]
        out[i] = {**out[i], **kw}
        return out

    i = next(j for j, r in enumerate(recs) if len(r["gt_labels"]) and len(r["labels"]))
    box = recs[i]["gt_boxes"].copy()
    box[0, 2] += 30.0
    variants = [
        (changed(i, gt_boxes=box), NAMES),
        (changed(i, gt_labels=recs[i]["gt_labels"] % 3 + 1), NAMES),
        (changed(i, gt_ignore=~recs[i]["gt_ignore"]), NAMES),
        (changed(i, height=recs[i]["height"] + 1), NAMES),
        (recs, ["cat", "dog", "fish"]),
    ]
    for variant, names in variants:
        cached = coco_evaluate(variant, names, backend=backend)
        assert _same(cached, coco_evaluate(variant, names, backend=backend, cache_gt=False))
        assert len(coco_mod._GT_CACHE) <= coco_mod.GT_CACHE_SIZE
    assert len(coco_mod._GT_CACHE) == coco_mod.GT_CACHE_SIZE  # 6 val sets seen, the oldest dropped
    coco_mod.clear_gt_cache()


# ---------------------------------------------------------------------------------------------------------
# COCO: precision-recall curve at IoU 0.5


@backends
def test_pr50_hand_case(backend: str) -> None:
    # cat: gts on images 1 and 2; detections by score: .9 TP (image 1), .8 FP, .7 TP (image 2). Points
    # (recall, precision): (.5, 1), (.5, .5), (1, 2/3); envelope 1, 2/3, 2/3. Recall thresholds 0...0.50
    # (51) take the first point (1), 0.51...1 (50) the third (2/3): AP50 = (51 + 50 * 2/3) / 101.
    # dog: one gt found by the only detection: 1 everywhere. bird: no gt, a detection: None everywhere.
    fp = [300, 300, 350, 350]
    recs = [
        record(1, [G1], [1], boxes=[G1, fp, G1], scores=[0.9, 0.8, 0.6], labels=[1, 1, 3]),
        record(2, [G2, [400, 10, 450, 60]], [1, 2], boxes=[G2, [400, 10, 450, 60]], scores=[0.7, 0.5],
               labels=[1, 2]),
    ]
    r = coco_evaluate(recs, NAMES, backend=_backend(backend))
    pr, cat = r["pr50"], r["pr50"]["precision"]["cat"]
    assert len(pr["recall"]) == 101 and pr["recall"][0] == 0.0 and pr["recall"][-1] == 1.0
    assert pr["recall"] == pytest.approx([i / 100 for i in range(101)], abs=1e-12)
    assert cat == pytest.approx([1.0] * 51 + [2 / 3] * 50, abs=1e-12)
    assert pr["precision"]["dog"] == pytest.approx([1.0] * 101, abs=1e-12)
    assert pr["precision"]["bird"] == [None] * 101
    assert set(pr["precision"]) == set(NAMES)
    ap50 = (51 + 50 * 2 / 3) / 101
    assert r["per_class"]["cat"]["AP50"] == pytest.approx(ap50, abs=1e-12)
    for name in ("cat", "dog"):  # COCO's AP50: the mean of the curve over its 101 recall thresholds
        assert np.mean(pr["precision"][name]) == pytest.approx(r["per_class"][name]["AP50"], abs=1e-12)
    assert r["pr50_all"] == pytest.approx([(c + 1.0) / 2 for c in cat], abs=1e-12)  # bird left out
    assert np.mean(r["pr50_all"]) == pytest.approx(r["AP50"], abs=1e-12)
    json.dumps(r["pr50"], allow_nan=False)  # plain JSON: None, not nan


def test_pr50_without_any_gt_and_on_generated_data() -> None:
    r = coco_evaluate([record(1, boxes=[G1], scores=[0.5], labels=[1])], NAMES, backend="auto")
    assert r["pr50_all"] == [None] * 101
    assert all(p == [None] * 101 for p in r["pr50"]["precision"].values())
    r = coco_evaluate(generated(seed=9), NAMES, backend="auto")
    for name in NAMES:
        assert np.mean(r["pr50"]["precision"][name]) == pytest.approx(r["per_class"][name]["AP50"], abs=1e-12)
    assert np.mean(r["pr50_all"]) == pytest.approx(r["AP50"], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# VOC: hand-computed AP


# cat: img1 g1 normal + g2 difficult, img2 g3 normal -> n_pos = 2. Detections by score:
#   d1 .9 on g1 -> TP | d2 .8 on g2 (difficult) -> ignored | d3 .7 nowhere -> FP
#   d4 .6 IoU 0.9 with g1, already claimed -> FP (duplicate) | d5 .5 on g3 -> TP
# Counted sequence TP FP FP TP: recall .5 .5 .5 1, precision 1 .5 1/3 .5
#   VOC12: envelope 1 (recall 0..0.5), .5 (0.5..1): AP = 0.5 * 1 + 0.5 * 0.5 = 0.75
#   VOC07: t = 0, .1, ..., .5 -> max precision at recall >= t = 1 (6 points); t = .6 ... 1 -> 0.5
#          (5 points): AP = (6 + 2.5) / 11
# dog: one gt, no detection -> AP 0.  bird: only a difficult gt (n_pos 0) -> nan, left out of the mean.
def voc_case() -> list[dict]:
    g1, g2, g3, gdog, gbird = (
        [0, 0, 10, 10],
        [20, 20, 30, 30],
        [0, 0, 10, 10],
        [30, 0, 40, 10],
        [50, 0, 60, 9],
    )
    return [
        record(
            1,
            [g1, g2, gbird],
            [1, 1, 3],
            [False, True, True],
            boxes=[g1, g2, [0, 0, 10, 9], gbird],
            scores=[0.9, 0.8, 0.6, 0.4],
            labels=[1, 1, 1, 3],
        ),
        record(2, [g3, gdog], [1, 2], boxes=[[50, 50, 60, 60], g3], scores=[0.7, 0.5], labels=[1, 1]),
    ]


def test_voc12_hand_case() -> None:
    r = voc_evaluate(voc_case(), NAMES, use_07_metric=False)
    assert r["per_class"]["cat"] == pytest.approx(0.75, abs=1e-12)
    assert r["per_class"]["dog"] == 0.0
    assert np.isnan(r["per_class"]["bird"])
    assert r["mAP"] == pytest.approx(0.375, abs=1e-12)
    assert r["headline"] == "mAP" and r["num_images"] == 2 and r["num_gt"] == 3


def test_voc07_hand_case() -> None:
    r = evaluate_records(voc_case(), NAMES, metric="voc07")
    assert r["per_class"]["cat"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert r["mAP"] == pytest.approx(8.5 / 22, abs=1e-12)
    assert r["metric"] == "voc07"


def test_voc_difficult_only_changes_nothing() -> None:
    # Dropping the detection on the difficult gt must leave AP unchanged (it was neither TP nor FP).
    recs = voc_case()
    keep = np.array([True, False, True, True])
    recs[0] = {**recs[0], **{k: recs[0][k][keep] for k in ("boxes", "scores", "labels")}}
    assert voc_evaluate(recs, NAMES, use_07_metric=False)["per_class"]["cat"] == pytest.approx(
        0.75, abs=1e-12
    )


# ---------------------------------------------------------------------------------------------------------
# Report and packaging


def test_metrics_table_renders() -> None:
    console = Console(record=True, width=120, file=io.StringIO())
    for metric in ("coco", "voc12"):
        r = evaluate_records(voc_case(), NAMES, metric=metric)
        console.print(metrics_table(r, title=metric))
    text = console.export_text()
    for s in ("AP50", "AR100", "mAP", "cat", "dog", "bird", "0.3750"):
        assert s in text


def test_metrics_import_no_torch() -> None:
    code = "import sys, accel_det.metrics; assert not {'torch', 'accelerate'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _devkit_voc_ap(records: list[dict], k: int, use_07_metric: bool) -> float:
    """A plain transcription of py-faster-rcnn's voc_eval for class k (no +1; >= threshold), as a second
    opinion on the vectorised implementation."""
    gts = {r["image_id"]: r for r in records}
    n_pos = sum(int((~r["gt_ignore"][r["gt_labels"] == k]).sum()) for r in records)
    dets = [
        (s, r["image_id"], b)
        for r in records
        for b, s, l in zip(r["boxes"], r["scores"], r["labels"], strict=True)
        if l == k
    ]
    dets.sort(key=lambda d: -d[0])
    claimed = {i: np.zeros(int((r["gt_labels"] == k).sum()), bool) for i, r in gts.items()}
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for d, (_, image_id, bb) in enumerate(dets):
        r = gts[image_id]
        bbgt, diff = r["gt_boxes"][r["gt_labels"] == k], r["gt_ignore"][r["gt_labels"] == k]
        ovmax, jmax = -np.inf, -1
        if len(bbgt):
            iw = np.maximum(np.minimum(bbgt[:, 2], bb[2]) - np.maximum(bbgt[:, 0], bb[0]), 0)
            ih = np.maximum(np.minimum(bbgt[:, 3], bb[3]) - np.maximum(bbgt[:, 1], bb[1]), 0)
            inter = iw * ih
            uni = (
                (bb[2] - bb[0]) * (bb[3] - bb[1])
                + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1])
                - inter
            )
            ov = inter / uni
            ovmax, jmax = ov.max(), ov.argmax()
        if ovmax >= 0.5:
            if not diff[jmax]:
                if not claimed[image_id][jmax]:
                    tp[d], claimed[image_id][jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / n_pos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        return sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) / 11 for t in np.linspace(0, 1, 11))
    mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_voc_matches_devkit_loop(use_07_metric: bool) -> None:
    recs = generated(seed=4)  # gt_ignore plays "difficult" here
    r = voc_evaluate(recs, NAMES, use_07_metric=use_07_metric)
    for k, name in enumerate(NAMES, start=1):
        assert r["per_class"][name] == pytest.approx(_devkit_voc_ap(recs, k, use_07_metric), abs=1e-12)
