"""The executor block of a sweep config is checked before anything starts (no Ray needed)."""

from __future__ import annotations

import pytest

from mergekit_core import ConfigError, ParameterError, UsageError
from mergekit_core.api import MergeConfig, run_sweep


@pytest.fixture
def sweep(toy_pool, host, tmp_path):
    def run(executor):
        data = {"sources": [str(toy_pool[t]) for t in ("ft1", "ft2", "ft3")], "base_model": str(toy_pool["base"]),
                "method": "task_arithmetic", "evaluator": "closeness",
                "evaluator_params": {"pool": str(toy_pool["base"].parent)}, "output_dir": str(tmp_path / "out"),
                "search": {"type": "grid", "grid": {"lambda": [0.1]}}, "executor": executor}
        return run_sweep(MergeConfig.from_dict(data), host)

    return run


@pytest.mark.parametrize("executor, error, message", [
    ({"name": "ray", "params": {"address": "10.0.0.1:6379"}}, ConfigError,
     "address must be local, auto or ray://HOST:PORT, got '10.0.0.1:6379'"),
    ({"name": "ray", "params": {"max_concurent": 2}}, ParameterError, "did you mean 'max_concurrent'"),
    ({"name": "ray", "params": {"num_gpus": -1}}, ParameterError, "num_gpus"),
    ({"name": "rya"}, UsageError, "did you mean 'ray'"),
    ({"name": "ray", "workers": 2}, ConfigError, "give a name or {name: NAME, params: {...}}"),
])
def test_a_bad_executor_block_is_an_error_that_names_it(sweep, tmp_path, executor, error, message):
    with pytest.raises(error) as err:
        sweep(executor)
    assert message in str(err.value)
    assert not list((tmp_path / "out").rglob("journal_*.jsonl"))  # before any trial
