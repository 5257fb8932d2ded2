"""Every shipped recipe validates (torchtune style) and names a registered model."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel_det.config import KNOWN_MODELS
from accel_det.config_io import load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))


def test_there_are_recipes() -> None:
    assert any(p.name == "demo.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.name in KNOWN_MODELS
    assert recipe.num_classes == len(recipe.data.class_names)


def test_every_torchvision_model_has_a_recipe() -> None:
    used = {load_recipe(p).model.name for p in RECIPES}
    assert {m for m in KNOWN_MODELS if m.startswith("tv_")} <= used


def test_readme_reference_is_current() -> None:
    from accel_det.config_io import reference_markdown

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- reference:start -->\n", 1)[1].split("\n<!-- reference:end -->", 1)[0]
    assert block == reference_markdown(), "README's recipe reference is stale: paste `accel-det reference`"
