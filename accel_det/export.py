"""``accel-det export RUN_DIR [--checkpoint best|last|PATH] [--format onnx|pt2] [--out FILE] [--opset N]
[--batch dynamic|N] [--dynamic-size] [key=value ...]`` (also ``python -m accel_det.export``).

Writes the run's detector (through engine/run.py, so a run with EMA exports its EMA weights) as one graph with
decode, score threshold and per-class NMS inside: input ``images`` float32 (N, C, H, W) in [0, 1], outputs
``boxes`` (N, max_det, 4) xyxy input pixels, ``scores``, ``labels`` (1..K, 0 in padding), ``num_dets`` (N,).
The thresholds are the recipe's ``eval.*`` (override them like any key). Default file:
``RUN_DIR/export/<checkpoint>.<format>``; the metadata (class names, input size, normalisation, letterbox,
thresholds, versions) goes into the file and beside it as ``<file>.json``.

Then the command runs the file it wrote (onnxruntime / the torch.export program) on a few val images at batch
1 and 4 and compares every detection with the eager model's; a difference is an error (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from accel_det.deploy import FORMATS, ExportError
from accel_det.errors import UsageError, run_cli


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--batch {text}: 'dynamic' or a positive integer")


def export_run(run_dir: Path, checkpoint: str = "best", fmt: str = "onnx", out: Path | None = None,
               opset: int | None = None, batch: str = "dynamic", dynamic_size: bool = False,
               overrides: list[str] | None = None) -> Path:
    """Export, write, check; returns the written file."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    fixed_batch = _batch(batch)
    if out is not None and out.suffix.lower() != f".{fmt}":
        raise UsageError(f"--out {out}: a --format {fmt} file must end in .{fmt}")
    if opset is not None and fmt != "onnx":
        raise UsageError("--opset is for --format onnx")
    if opset is not None and not 16 <= opset <= 23:
        # below 16 onnx's version converter cannot take the exporter's opset-18 graph down (Identity, ...)
        raise UsageError(f"--opset {opset}: ONNX opsets 16..23 (the exporter's own is 18)")

    from accel_det.deploy import require

    require(*(("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ()), what=f"--format {fmt}")
    from accel_det.deploy.build import DEFAULT_OPSET, build_graph, export_program, metadata, write
    from accel_det.deploy.check import check_export
    from accel_det.engine.run import open_run

    opened = open_run(run_dir, checkpoint, overrides or [])
    if opened.weights.note:
        print(f"note: {opened.weights.note}")
    recipe = opened.recipe
    out = out or Path(run_dir) / "export" / f"{opened.result_tag()}.{fmt}"
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder")
    opset = opset or DEFAULT_OPSET
    t0 = time.perf_counter()
    graph = build_graph(opened.model, recipe, dynamic_size)
    program = export_program(graph, recipe.model.name, recipe.model.channels, recipe.model.img_dim, fixed_batch,
                             dynamic_size)
    meta = metadata(opened, fmt, fixed_batch, dynamic_size, graph, opset)
    write(program, out, fmt, meta, opset)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s) and "
          f"{out.name}.json: {recipe.model.name} from {opened.weights.path}")
    try:
        report = check_export(out, opened.model, recipe, meta)
    except ExportError as exc:
        # a file that disagrees with its model must not be mistaken for a good export: kept aside for a look
        bad = out.with_name(out.name + ".mismatch")
        out.replace(bad)
        out.with_name(out.name + ".json").replace(bad.with_name(bad.name + ".json"))
        raise ExportError(f"{exc} (the file was moved to {bad.name})") from exc
    if report.note:
        print(f"note: {report.note}")
    print(f"checked: {report.summary()}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | checkpoint dir | weights file (default best, else last)")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (onnxruntime) or pt2 "
                        "(torch.export program; loading it needs accel_det installed for its NMS op)")
    parser.add_argument("--out", help="the file to write (default RUN_DIR/export/<checkpoint>.<format>)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    parser.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="native models: H and W dynamic (priors computed in the graph)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's recipe (e.g. eval.conf_thres)")


def run(args: argparse.Namespace) -> int:
    export_run(Path(args.run_dir), args.checkpoint, args.format, Path(args.out) if args.out else None, args.opset,
               args.batch, args.dynamic_size, list(args.overrides))
    return 0


def main(argv: list[str] | None = None) -> int:
    from accel_det.cli_args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="accel_det.export", description=__doc__)
    add_arguments(parser)
    args = parse_with_overrides(parser, argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
