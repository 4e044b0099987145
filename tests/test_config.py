"""The config schema: aliases, legacy keys, every config error as one line with exit status 2."""

from __future__ import annotations

import json
import warnings

import pytest

from mergekit_core.config import MergeConfig, load_merge_config, parse_size
from mergekit_core.errors import ConfigError
from mergekit_core.testing import run_mk


def write(tmp_path, text, name="merge.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sources_aliases_paths_relative_to_the_config_and_task_names(tmp_path, models):
    paths, _ = models
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "taskx").symlink_to(paths["ft1"])
    cfg = write(tmp_path, "adapters: [ft2, taskx]\nsources_root: pool\nmethod: uniform\nbase_model: base\n")
    spec = load_merge_config(cfg).to_spec()
    assert [s.name for s in spec.sources] == ["ft2", "taskx"]
    assert spec.sources[1].path == tmp_path / "pool" / "taskx"
    assert spec.base_model == tmp_path / "base" and spec.merge_mode == "common"
    assert spec.task_combo == "ft2_taskx"


def test_legacy_keys_load_with_a_deprecation_warning(tmp_path, models):
    cfg = write(tmp_path, "models: [ft1, ft2]\nmethod: weighted_delta\nlambda: 0.25\nparams: {normalize: false}\n"
                          "grid: {lambda: [0.1, 0.2]}\n")
    with pytest.warns(DeprecationWarning) as record:
        spec = load_merge_config(cfg).to_spec()
    messages = " ".join(str(w.message) for w in record)
    assert "'lambda' is deprecated; use method_params.lambda" in messages
    assert "search.grid" in messages and "method_params" in messages
    assert spec.method.params == {"normalize": False, "lambda": 0.25}
    assert spec.sweep["search"] == {"type": "grid", "grid": {"lambda": [0.1, 0.2]}}


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'metod' \\(did you mean 'method'\\?\\)"):
        MergeConfig.from_dict({"metod": "ties", "sources": ["a"]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources: [ft1]\n", "method: missing"),
        ("sources: [ft1]\nmethod: uniform\nmerge_mode: loose\n", "merge_mode: must be one of common, strict, union"),
        ("sources: [nowhere]\nmethod: uniform\n", r"sources\[0\]: nowhere is not a path"),
        ("sources: ft1\nmethod: uniform\n", "sources: give a list"),
        ("sources: [ft1]\nmethod: uniform\noutput: {dtype: fp8}\n", "output.dtype: unknown dtype 'fp8'"),
        ("sources: [ft1]\nmethod: uniform\noutput: {shard_sise: 1GB}\n", "did you mean 'shard_size'"),
        ("sources: [ft1]\nmethod: uniform\noutput: {adapter_rank: 0}\n", "adapter_rank: must be a positive integer"),
        ("sources: [ft1]\nmethod: uniform\nbase_model: nope\n", "base_model: .*nope does not exist"),
        ("sources: [ft1, ft1]\nmethod: uniform\n", "the name 'ft1' is used twice"),
        ("sources: [ft1]\nmethod: uniform\nseed: abc\n", "seed: must be an integer"),
        ("sources: [ft1]\nmethod: {name: uniform, param: {}}\n", "method: unknown key 'param'"),
        ("sources: [ft1]\nmethod: uniform\ntransforms: identity\n", "transforms: must be a list"),
        ("sources: [ft1\n", "not valid YAML at line"),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, models, text, message):
    import re

    cfg = write(tmp_path, text)
    result = run_mk(["merge", str(cfg), "--output-dir", str(tmp_path / "a")])
    assert result.exit_code == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("Error: ") and re.search(message, first), first
    assert "Traceback" not in result.stderr


def test_all_problems_are_reported_at_once(tmp_path, models):
    cfg = write(tmp_path, "sources: [ft1, nowhere]\nmethod: uniform\nmerge_mode: loose\nseed: x\n")
    with pytest.raises(ConfigError) as err:
        load_merge_config(cfg).to_spec()
    msg = str(err.value)
    assert "nowhere" in msg and "merge_mode" in msg and "seed" in msg


def test_missing_config_file_and_unknown_method(tmp_path, models):
    result = run_mk(["merge", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "config file does not exist" in result.stderr
    cfg = write(tmp_path, "sources: [ft1, ft2]\nbase_model: base\nmethod: ties\n")
    result = run_mk(["merge", str(cfg), "--output-dir", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "unknown merge method 'ties'; installed: " in result.stderr
    assert ("hint: 'ties' comes from the mk-ties plugin in this project's plugins/ folder: "
            "pip install -e plugins/mk-ties from a checkout") in result.stderr
    assert "pip install mk-ties" not in result.stderr  # never a name the project does not publish


def test_flags_override_the_config(tmp_path, models):
    cfg = write(tmp_path, "sources: [ft1, ft2]\nbase_model: base\nmethod: uniform\nmethod_params: {}\n")
    out = tmp_path / "o"
    result = run_mk(["merge", str(cfg), "--method", "task_arithmetic", "--lambda", "0.7", "--out", str(out),
                     "--output-dir", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "task_arithmetic" and summary["output"] == str(out)
    meta = json.loads((tmp_path / summary["run_dir"] / "merge_metadata.json").read_text())
    assert meta["lambda_values"] == {"lambda": 0.7}


def test_merge_from_flags_with_space_separated_adapters(tmp_path, lora_adapters, models):
    apaths, _ = lora_adapters
    paths, _ = models
    out = tmp_path / "merged"
    result = run_mk(["merge", "--method", "task_arithmetic", "--adapters", str(apaths["a"]), str(apaths["b"]),
                     "--lambda", "0.3", "--out", str(out), "--output-dir", str(tmp_path / "art")])
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter_config.json").is_file() and "adapter:" in result.stdout


def test_dry_run_reads_no_tensor_and_fails_where_the_merge_would(tmp_path, models, monkeypatch):
    from mergekit_core.io import readers

    def forbidden(self, name):
        raise AssertionError("a dry run read a tensor")

    monkeypatch.setattr(readers.SafetensorsReader, "get", forbidden)
    paths, _ = models
    result = run_mk(["merge", "--method", "weighted_delta", "--base", str(paths["base"]), "--sources",
                     str(paths["ft1"]), str(paths["ft2"]), str(paths["ft3"]), "--dry-run", "--policy", "per_layer"])
    assert result.exit_code == 0, result.stderr
    assert "11 merged, 2 copied, 0 left out" in result.stdout
    assert "only in 2 of 3 sources" in result.stdout and "lambda per source" in result.stdout
    strict = run_mk(["merge", "--method", "uniform", "--base", str(paths["base"]), "--sources",
                     str(paths["ft1"]), str(paths["ft3"]), "--mode", "strict", "--dry-run"])
    assert strict.exit_code == 1 and "merge_mode strict" in strict.stderr


def test_parse_size():
    assert parse_size("5GB", "x") == 5 * 10**9
    assert parse_size("2GiB", "x") == 2 * 2**30
    assert parse_size(1234, "x") == 1234
    with pytest.raises(ConfigError):
        parse_size("lots", "x")


def test_no_warning_for_current_keys(tmp_path, models):
    cfg = write(tmp_path, "sources: [ft1]\nmethod: uniform\nmethod_params: {}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_merge_config(cfg).to_spec()


def test_evaluator_paths_are_relative_to_the_config(tmp_path, models):
    (tmp_path / "pool").mkdir()
    cfg = write(tmp_path, "sources: [ft1]\nmethod: uniform\nevaluator: x\n"
                          "evaluator_params: {pool: pool, missing: nowhere, n: 3}\n")
    params = load_merge_config(cfg).to_spec().sweep["evaluator_params"]
    assert params == {"pool": str((tmp_path / "pool").resolve()), "missing": "nowhere", "n": 3}
