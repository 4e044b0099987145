"""Every canonical config in configs/ runs, and the README's demo command works."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_core.config import load_merge_config
from mergekit_core.demo import build_pool, main
from mergekit_core.engine import run_merge
from mergekit_core.io.peft_reader import AdapterReader
from mergekit_core.testing import fresh_host

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
HOST = fresh_host(entry_points=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_pool(tmp_path_factory.mktemp("pool"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_canonical_config_runs(config, pool, tmp_path):
    cfg = load_merge_config(config)
    if "search" in cfg.data:
        pytest.skip("a sweep config on the digits pool: run by the tests that build one "
                    "(mk-digits test_ready_sweep_config_runs, mk-bayes-sweep test_digits_config)")
    if cfg.data.get("optimizer", {}).get("name") == "adamerging":
        pytest.skip("learns from the digits pool: run by plugins/mk-adamerging/tests "
                    "(test_the_example_config_runs_on_a_pool)")
    needed = {cfg.data["method"] if isinstance(cfg.data["method"], str) else cfg.data["method"]["name"]}
    if not all(HOST.find(n) for n in needed):
        pytest.skip(f"the plugin providing {needed} is not installed")
    root = pool["base"].parent
    spec = cfg.with_overrides({"sources_root": str(root), "base_model": str(pool["base"]),
                               "output_dir": str(tmp_path / "art"), "output.path": str(tmp_path / "out")}).to_spec()
    result = run_merge(spec, HOST)
    assert result.report["merged"] > 0
    if result.output_kind == "adapter":
        assert AdapterReader(tmp_path / "out").targets()
    else:
        assert (tmp_path / "out" / "model.safetensors").is_file()


def test_demo_runs(tmp_path, capsys):
    main(["--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "demo merges" in out and "merge_weighted_scalar" in out
    assert (tmp_path / "demo" / "merged" / "merge_adapters_lora" / "adapter_config.json").is_file()
    main(["--out", str(tmp_path / "demo")])  # the pool is reused, the merges run again
