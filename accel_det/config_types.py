"""The building blocks of the recipe schema: strict scalar types, the table base class, and the error a
validator raises about a key below its table. Torch-free, like the schema."""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict

# Strict scalars: TOML has real ints, floats and bools, so `max_epoch = true` or `lr = "0.1"` is a mistake
# to report, not to coerce (pydantic's lax mode reads true as 1 and "1" as 1). Floats still take ints
# (`lr = 1`). Strict() sits on the scalars only: global strict mode would also refuse TOML arrays for
# tuple fields.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]
StrictBool = Annotated[bool, Strict()]
PosInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PosFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
Prob = Annotated[float, Strict(), Field(ge=0, le=1)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Factor = Annotated[float, Strict(), Field(gt=0, le=1)]  # (0, 1]: decay and warmup factors
UnitOpen = Annotated[float, Strict(), Field(ge=0, lt=1)]  # [0, 1): momentum, betas


class KeyedError(ValueError):
    """A validator's error about a key below (or beside) the validated table: ``key`` is dotted, relative
    to the table whose validator raised it, and ``_format_error`` appends it to the error's location."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = tuple(key.split("."))


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
