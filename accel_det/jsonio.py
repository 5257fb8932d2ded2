"""JSON files the project writes: strict (no NaN/inf) and atomic. Torch-free and engine-free, so the engine,
the entry points and the report package all use the same rules without importing one another."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict_json(obj: Any) -> Any:
    """NaN/inf -> null, so that every JSON we write parses with strict parsers (jq, JavaScript)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write via a temp file + os.replace: a killed process never leaves half a JSON file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(strict_json(obj), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
