from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy import make_models  # noqa: E402


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("toy") / "pool")


@pytest.fixture(scope="session")
def host():
    import toy
    from mk_bayes_sweep import plugin

    from mergekit_core.testing import fresh_host

    return fresh_host({"bayes_sweep": plugin, "closeness": toy.plugin})


@pytest.fixture
def sweep_config(toy_models, tmp_path):
    """A task-arithmetic sweep config over the toy models; keyword arguments replace keys."""

    def make(**extra):
        data = {"sources": [str(toy_models[t]) for t in ("ft1", "ft2", "ft3")], "base_model": str(toy_models["base"]),
                "method": "task_arithmetic", "evaluator": "closeness",
                "evaluator_params": {"pool": str(toy_models["base"].parent)}, "split": "validation",
                "output_dir": str(tmp_path / "art"),
                "search": {"type": "bayes", "budget": 8, "init_points": 3, "seed": 1,
                           "space": {"lambda": {"type": "float", "min": 0.0, "max": 1.0}}}}
        data.update(extra)
        return data

    return make
