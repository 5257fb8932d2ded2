"""The loop's hook points: ``after_step``, ``after_epoch``, ``after_train``.

Every process enters every hook. Collectives (gather_for_metrics, save_state, wait_for_everyone, broadcast)
run on all; only file writes, printing and COCOeval are main-process-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from accel_det.engine.checkpoint import Checkpointer
from accel_det.engine.distributed import write_json_atomic
from accel_det.engine.evaluator import evaluate
from accel_det.engine.progress import RunLog


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps of one process
    best_metric: float | None = None
    best_epoch: int | None = None
    last_metric: float | None = None
    last_is_best: bool = False

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": 0,  # checkpoints are taken at epoch ends
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            **extra,
        }


@dataclass
class Context:
    recipe: Any
    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    scheduler: Any
    val_loader: Any
    run_dir: Path
    log: RunLog
    state: TrainState
    category_ids: list[int]  # of the val set: predictions files use the val annotations' own ids
    steps_per_epoch: int

    @property
    def last_epoch(self) -> bool:
        return self.state.epoch >= self.recipe.train.max_epoch

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class Hook:
    def after_step(self, ctx: Context) -> None: ...
    def after_epoch(self, ctx: Context) -> None: ...
    def after_train(self, ctx: Context) -> None: ...


class EvalHook(Hook):
    """COCO / VOC mAP every ``eval.freq`` epochs and after the last one."""

    def after_epoch(self, ctx: Context) -> None:
        ev = ctx.recipe.eval
        ctx.state.last_metric, ctx.state.last_is_best = None, False
        due = ev.freq > 0 and ctx.state.epoch % ev.freq == 0
        if not ev.compute_map or not (due or ctx.last_epoch):
            return
        from accel_det.metrics import coco_results, metrics_table

        model = ctx.accelerator.unwrap_model(ctx.model)
        result, records, headline = evaluate(model, ctx.val_loader, ctx.accelerator, ctx.recipe)
        st = ctx.state
        st.last_metric = headline
        if headline is not None and (st.best_metric is None or headline > st.best_metric):
            st.best_metric, st.best_epoch, st.last_is_best = headline, st.epoch, True
        if result is not None:  # main process
            tag = f"epoch_{st.epoch:04d}"
            eval_dir = ctx.run_dir / "eval"
            eval_dir.mkdir(exist_ok=True)
            write_json_atomic(eval_dir / f"{tag}.json", {"epoch": st.epoch, "step": st.global_step, **result})
            write_json_atomic(eval_dir / f"predictions_{tag}.json", coco_results(records, ctx.category_ids))
            ctx.log.print_renderable(metrics_table(result, title=f"{ev.metric} @ epoch {st.epoch}"))
            flat = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            ctx.log.event({"event": "eval", "epoch": st.epoch, "step": st.global_step, **flat,
                           "per_class": result.get("per_class")}, step=st.global_step)


class CheckpointHook(Hook):
    """``save_state`` every ``output.checkpoint_freq`` epochs, at the end, and whenever eval found a new best."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def after_epoch(self, ctx: Context) -> None:
        out, st = ctx.recipe.output, ctx.state
        periodic = out.checkpoint_freq > 0 and st.epoch % out.checkpoint_freq == 0
        best = out.save_best and st.last_is_best
        if periodic or best or ctx.last_epoch:
            extra = {"lr": ctx.lr(), "num_processes": ctx.accelerator.num_processes,
                     "steps_per_epoch": ctx.steps_per_epoch, "last_metric": st.last_metric}
            path = self.checkpointer.save(st.epoch, st.to_dict(**extra), is_best=best,
                                          recipe=ctx.recipe.model_dump(mode="json"))
            ctx.log.info(f"checkpoint: {path}" + (" (best)" if best else ""))

    def after_train(self, ctx: Context) -> None:
        # final weights as one safetensors file, for `accel-det predict` and for other tools
        ctx.accelerator.wait_for_everyone()
        ctx.accelerator.save_model(ctx.model, str(ctx.run_dir), safe_serialization=True)
