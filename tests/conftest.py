"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): a test that builds its own
    Accelerator in this process starts from scratch and leaves nothing behind for the next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
