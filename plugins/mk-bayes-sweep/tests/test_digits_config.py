"""The canonical config, configs/merge_weighted_delta_sweep_bayes.yaml, on a (quick) digits pool."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "merge_weighted_delta_sweep_bayes.yaml"


def test_the_canonical_bayes_config_runs_on_a_digits_pool(tmp_path_factory):
    pytest.importorskip("mk_digits", reason="the digits evaluator comes with plugins/mk-digits")
    from mk_bayes_sweep import plugin
    from mk_digits import plugin as digits_plugin
    from mk_digits.build import BuildSettings, build_pool

    from mergekit_core.api import load_merge_config, run_sweep
    from mergekit_core.testing import fresh_host

    pool = tmp_path_factory.mktemp("digits") / "pool"
    build_pool(pool, BuildSettings.quick())
    art = tmp_path_factory.mktemp("art")
    host = fresh_host({"bayes_sweep": plugin, "digits": digits_plugin})
    cfg = load_merge_config(CONFIG)
    assert cfg.data["search"]["type"] == "bayes" and cfg.data["search"]["space"]["lambdas"]["size"] == "tasks"
    search = {**cfg.data["search"], "budget": 6, "init_points": 3,
              "warm_start_sweeps": str(art / "merged" / "weighted_delta" / "*" / "sweeps" / "sweep_*.json")}
    cfg = cfg.with_overrides({"sources_root": str(pool), "base_model": str(pool / "base"),
                              "evaluator_params": {"pool": str(pool)}, "output_dir": str(art), "search": search})
    first = run_sweep(cfg, host)
    assert len(first["points"]) == 6 and all(len(r["point"]["lambdas"]) == 8 for r in first["points"])
    assert all(0.0 <= v <= 1.0 for r in first["points"] for v in r["point"]["lambdas"])
    assert first["warm_start"]["points"] == 0
    second = run_sweep(cfg, host)  # the first sweep's summary now warms the second
    assert second["warm_start"]["points"] == 6 and second["warm_start"]["skipped"] == {}
    assert all(r["proposal"]["phase"] == "gp" for r in second["points"])
    seen = {str(r["point"]) for r in first["points"]}
    assert not seen & {str(r["point"]) for r in second["points"]}
