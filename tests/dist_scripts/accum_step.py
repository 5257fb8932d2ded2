"""One optimizer step through the trainer's ``train_step``; saves params before and after.

    torchrun --nproc_per_node N tests/dist_scripts/accum_step.py OUT.pt RECIPE [key=value ...]

Used by tests/test_distributed.py to compare 1 process x accumulation 2 with 2 processes x accumulation 1.
Batch-norm layers are put in eval mode (running statistics) so that a sample's gradient does not depend on
which other samples share its batch; everything else is the real pipeline (recipe, loaders, accelerator).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.data import build_datasets, build_loaders
from accel_det.engine.distributed import build_accelerator
from accel_det.engine.trainer import train_step
from accel_det.models import build_model
from accel_det.optim import build_optimizer


def main() -> None:
    out = Path(sys.argv[1])
    recipe = load_recipe(sys.argv[2], sys.argv[3:])
    accelerator = build_accelerator(recipe)
    set_seed(recipe.train.seed)
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(recipe)
    train_loader, _ = build_loaders(recipe, train_ds, val_ds, seed=recipe.train.seed)
    model, _ = build_model(recipe)
    optimizer = build_optimizer(model, recipe.optimizer)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    before = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    train_loader.set_epoch(0)
    micro_batches: list[list[int]] = []
    for images, targets in train_loader:
        # which images went into which micro-batch, from every process (process order)
        micro_batches += gather_object([[int(t["image_id"]) for t in targets]])
        train_step(accelerator, model, optimizer, scheduler, images, targets)  # the trainer's own step
        if accelerator.sync_gradients:
            break

    if accelerator.is_main_process:
        after = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save({"before": before, "after": after, "micro_batches": micro_batches,
                    "num_processes": accelerator.num_processes}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
