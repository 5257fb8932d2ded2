"""Experiment trackers: the names ``log.trackers`` accepts and the packages each needs, without torch.

Accelerate drops a tracker whose package is missing without a word, so the run checks at start
(engine/distributed.py ``check_trackers``) and stops with the package to install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

# what accelerate's ``log_with`` accepts (accelerate.utils.LoggerType); the package is checked at start
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


# tracker -> (import name, distributions that may provide it) pairs, any of which satisfies accelerate's
# is_<tracker>_available() (accelerate/utils/imports.py); the first import name is what to pip install
TRACKER_PACKAGES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "tensorboard": (("tensorboard", ("tensorboard",)), ("tensorboardX", ("tensorboardX",))),
    "wandb": (("wandb", ("wandb",)),),
    "comet_ml": (("comet_ml", ("comet_ml",)),),
    "aim": (("aim", ("aim",)),),
    "mlflow": (("mlflow", ("mlflow", "mlflow-skinny")),),
    "clearml": (("clearml", ("clearml",)),),
    "dvclive": (("dvclive", ("dvclive",)),),
    "swanlab": (("swanlab", ("swanlab",)),),
    "trackio": (("trackio", ("trackio",)),),
}


def _installed(module: str, distributions: tuple[str, ...]) -> bool:
    """accelerate's test: the module is importable *and* a distribution of that name is installed, so a
    bare folder of that name (wandb's own ./wandb run dir) does not count."""
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):  # a broken parent package, or a module in sys.modules without a spec
        return False
    for dist in distributions:
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def missing_tracker_packages(trackers: list[str]) -> list[str]:
    """One line per tracker in ``log.trackers`` that accelerate would not find. Accelerate drops such a
    tracker silently, so the run would go on without the logging that was asked for. Torch-free."""
    missing = []
    for name in trackers:
        options = TRACKER_PACKAGES.get(name)
        if options is None:
            continue  # LogConfig rejects unknown names
        if not any(_installed(module, dists) for module, dists in options):
            pkgs = " or ".join(module for module, _ in options)
            missing.append(f"log.trackers: {name!r} needs the package {pkgs} (pip install {options[0][0]})")
        elif name == "aim" and _major_version("aim") >= 4:
            # accelerate's AimTracker is written for aim 3 and reports aim >= 4 as unavailable
            missing.append("log.trackers: 'aim' needs aim < 4 (pip install 'aim<4')")
    return missing


def _major_version(dist: str) -> int:
    try:
        m = re.match(r"\d+", importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return 0
    return int(m.group()) if m else 0
