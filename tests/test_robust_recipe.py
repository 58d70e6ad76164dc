"""``bench/robust_recipe.py``: every candidate is a valid config, and a shared lifter is the same training."""

from __future__ import annotations

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def recipe():
    return load_bench("robust_recipe")


def test_every_candidate_loads_and_every_shared_lifter_is_the_same_training(recipe):
    configs = {name: recipe.candidate_config(name, 5000, 1024) for name in recipe.CANDIDATES}
    assert set(recipe.SHARED_LIFTER) <= set(configs) and set(recipe.SHARED_LIFTER.values()) <= set(configs)
    for name, donor in recipe.SHARED_LIFTER.items():
        assert recipe.same_lifter_training(configs[name], configs[donor]), f"{name} cannot share {donor}'s lifter"
    # Candidates that change what the lifter reads train their own.
    for name in ("lr0.002", "batch512", "batch512_half_steps", "broad_cameras", "backbone_dropout0.1", "limb_swap0.25"):
        assert name not in recipe.SHARED_LIFTER
        assert not recipe.same_lifter_training(configs[name], configs["default"])
