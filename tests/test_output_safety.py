"""Outputs never replace what the user did not ask to replace; merged values that the output
dtype cannot hold are refused; outputs get the permissions of the umask (issue 11, items 1-4, 6, 9).

Every writing command is covered: ``mk merge`` (model and adapter outputs, run-bundle root),
``mk svd-hybrid compress`` and ``reconstruct``, and the digits pool builder.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_core.io.destination import MARKER, check_destination
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes: what must survive a refused write unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _merge(args: list[str]) -> object:
    return run_mk(["merge", "--method", "task_arithmetic", "--lambda", "0.3", "-q", *args], host=HOST)


def _pool_args(paths: dict[str, Path]) -> list[str]:
    return ["--base", str(paths["base"]), "--sources", str(paths["ft1"]), str(paths["ft2"])]


def _user_folder(path: Path) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return path


def _assert_one_line_error(result: object, *words: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


# --------------------------------------------------------------------------- data loss, items 1-4


def test_a_folder_mk_did_not_write_is_refused_then_replaced_only_with_force(tmp_path, models):
    paths, _ = models
    folder = _user_folder(tmp_path / "notes")
    before = _tree(folder)
    refused = _merge([*_pool_args(paths), "--out", str(folder), "--output-dir", str(tmp_path / "art")])
    _assert_one_line_error(refused, "non-empty directory", "notes.txt", "--force")
    assert _tree(folder) == before
    assert not (tmp_path / "art").exists() or not list((tmp_path / "art").rglob("merge_metadata.json"))

    forced = run_mk(["merge", "--method", "task_arithmetic", "--lambda", "0.3", *_pool_args(paths), "--out",
                     str(folder), "--output-dir", str(tmp_path / "art"), "--force", "--json"], host=HOST)
    assert forced.exit_code == 0, forced.stderr
    summary = json.loads(forced.stdout)
    assert any("replaced 2 entries" in w and "notes.txt" in w for w in summary["warnings"])
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "README.md", "config.json", "model.safetensors"]


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_even_with_force(tmp_path, models):
    paths, _ = models
    pool = paths["base"].parent
    before = {name: _tree(p) for name, p in paths.items()}
    for out, relation in ((pool, "contains"), (paths["ft1"], "is"), (paths["base"] / "merged", "lies inside")):
        for force in ([], ["--force"]):
            result = _merge([*_pool_args(paths), "--out", str(out), "--output-dir", str(tmp_path / "art"), *force])
            _assert_one_line_error(result, relation, "the input")
    assert {name: _tree(p) for name, p in paths.items()} == before


def test_an_existing_file_is_never_replaced(tmp_path, models):
    paths, _ = models
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    for force in ([], ["--force"]):
        result = _merge([*_pool_args(paths), "--out", str(target), "--output-dir", str(tmp_path / "art"), *force])
        _assert_one_line_error(result, "existing file")
    assert target.read_bytes() == b"precious"


def test_a_previous_output_is_replaced_but_not_if_the_user_added_files(tmp_path, models):
    paths, tensors = models
    out = tmp_path / "merged"
    assert _merge([*_pool_args(paths), "--out", str(out), "--output-dir", str(tmp_path / "art")]).exit_code == 0
    again = run_mk(["merge", "--method", "task_arithmetic", "--lambda", "0.5", "-q", *_pool_args(paths),
                    "--out", str(out), "--output-dir", str(tmp_path / "art")], host=HOST)
    assert again.exit_code == 0, again.stderr
    name = "model.layers.0.self_attn.q_proj.weight"
    b, a1, a2 = (tensors[k][name].double() for k in ("base", "ft1", "ft2"))
    torch.testing.assert_close(load_file(out / "model.safetensors")[name].double(), b + 0.5 * (a1 - b + a2 - b))
    (out / "notes.md").write_text("my notes on this model")
    refused = _merge([*_pool_args(paths), "--out", str(out), "--output-dir", str(tmp_path / "art")])
    _assert_one_line_error(refused, "previous mk output did not write", "notes.md")
    assert (out / "notes.md").read_text() == "my notes on this model"


def test_dry_run_checks_the_output_too(tmp_path, models):
    paths, _ = models
    result = _merge([*_pool_args(paths), "--out", str(paths["ft2"]), "--dry-run"])
    _assert_one_line_error(result, "is the input")


def test_the_run_bundle_root_may_not_lie_inside_an_input(tmp_path, models):
    paths, _ = models
    before = _tree(paths["ft1"])
    result = _merge([*_pool_args(paths), "--out", str(tmp_path / "out"), "--output-dir", str(paths["ft1"] / "runs")])
    _assert_one_line_error(result, "run-bundle root", "lies inside")
    assert _tree(paths["ft1"]) == before and not (tmp_path / "out").exists()
    inside_out = _merge([*_pool_args(paths), "--out", str(tmp_path / "o"), "--output-dir", str(tmp_path / "o" / "a")])
    _assert_one_line_error(inside_out, "run-bundle root")


def test_adapter_outputs_follow_the_same_rules(tmp_path, models, lora_adapters):
    paths, _ = models
    adapters, _ = lora_adapters
    before = _tree(adapters["a"])
    result = run_mk(["merge", "--method", "task_arithmetic", "--adapters", str(adapters["a"]), str(adapters["b"]),
                     "--out", str(adapters["a"]), "--output-dir", str(tmp_path / "art")], host=HOST)
    _assert_one_line_error(result, "is the input")
    assert _tree(adapters["a"]) == before
    folder = _user_folder(tmp_path / "mine")
    result = run_mk(["merge", "--method", "task_arithmetic", "--adapters", str(adapters["a"]), str(adapters["b"]),
                     "--out", str(folder), "--output-dir", str(tmp_path / "art")], host=HOST)
    _assert_one_line_error(result, "non-empty directory")


def test_svd_hybrid_commands_follow_the_same_rules(tmp_path, models):
    paths, _ = models
    before = {name: _tree(p) for name, p in paths.items()}
    folder = _user_folder(tmp_path / "mine")
    compress = ["svd-hybrid", "compress", "--base", str(paths["base"]), str(paths["ft1"]), str(paths["ft2"]), "-q"]
    _assert_one_line_error(run_mk([*compress, "--out", str(paths["ft1"])], host=HOST), "is the input")
    _assert_one_line_error(run_mk([*compress, "--out", str(folder)], host=HOST), "non-empty directory")
    artifact = tmp_path / "artifact"
    assert run_mk([*compress, "--out", str(artifact)], host=HOST).exit_code == 0
    assert run_mk([*compress, "--out", str(artifact)], host=HOST).exit_code == 0  # its own previous output
    rebuild = ["svd-hybrid", "reconstruct", str(artifact), "--base", str(paths["base"]), "-q"]
    _assert_one_line_error(run_mk([*rebuild, "--out", str(artifact)], host=HOST), "is the input")
    _assert_one_line_error(run_mk([*rebuild, "--out", str(paths["base"])], host=HOST), "is the input")
    _assert_one_line_error(run_mk([*rebuild, "--out", str(folder)], host=HOST), "non-empty directory")
    assert run_mk([*rebuild, "--out", str(folder), "--force"], host=HOST).exit_code == 0
    diagnose = run_mk(["svd-hybrid", "diagnose", str(artifact), "--write", str(artifact / "manifest.json")],
                      host=HOST)
    _assert_one_line_error(diagnose, "would change the artifact")
    assert {name: _tree(p) for name, p in paths.items()} == before


def test_the_digits_pool_builder_refuses_a_foreign_folder(tmp_path):
    from mk_digits.build import BuildSettings, build_pool

    from mergekit_core.errors import UsageError

    folder = _user_folder(tmp_path / "pool")
    before = _tree(folder)
    with pytest.raises(UsageError, match="non-empty directory"):
        build_pool(folder, BuildSettings.quick())
    assert _tree(folder) == before


def test_check_destination_rules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.safetensors").write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(Exception, match="is the input"):
        check_destination(link, inputs=[src])  # a symbolic link to an input is that input
    with pytest.raises(Exception, match="lies inside"):
        check_destination(tmp_path / "src" / ".." / "src" / "sub", inputs=[src])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_destination(empty, inputs=[src]) == []
    assert check_destination(tmp_path / "new", inputs=[src]) == []


# --------------------------------------------------------------------------- item 6: non-finite outputs


def _large_models(tmp_path: Path, dtype: torch.dtype, base_value: float, source_value: float) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name, value in (("base", base_value), ("a", source_value), ("b", source_value)):
        d = tmp_path / name
        d.mkdir()
        tensors = {
            "model.norm.weight": torch.full((16,), value) + (0 if name == "base" else torch.rand(16, generator=g)),
            "model.layers.0.mlp.up_proj.weight": torch.randn(8, 16, generator=g),
        }
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
        paths[name] = d
    return paths


def test_fp16_overflow_of_the_merge_is_an_error_not_an_inf(tmp_path):
    paths = _large_models(tmp_path, torch.float16, 40000.0, 60000.0)
    args = ["merge", "--method", "task_arithmetic", "--lambda", "1", "--base", str(paths["base"]),
            "--sources", str(paths["a"]), str(paths["b"]), "--output-dir", str(tmp_path / "art")]
    result = run_mk([*args, "--out", str(tmp_path / "out")], host=HOST)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "model.norm.weight" in result.stderr and "exceed the range of float16" in result.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "art").rglob("merge_metadata.json"))
    written = run_mk([*args, "--out", str(tmp_path / "out"), "--allow-nonfinite", "--json"], host=HOST)
    assert written.exit_code == 0, written.stderr
    summary = json.loads(written.stdout)
    assert any("model.norm.weight" in w for w in summary["warnings"])
    assert "warning: " in written.stderr and "model.norm.weight" in written.stderr  # for the person too
    quiet = run_mk([*args, "--out", str(tmp_path / "out"), "--allow-nonfinite", "--quiet", "--force"], host=HOST)
    assert quiet.stdout == "" and "model.norm.weight" in quiet.stderr
    meta = json.loads((Path(summary["run_dir"]) / "merge_metadata.json").read_text())
    assert meta["report"]["nonfinite_written"] == {"model.norm.weight": 16}
    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"]).all()


def test_a_bf16_base_written_as_fp16_beyond_its_range_is_an_error(tmp_path):
    paths = _large_models(tmp_path, torch.bfloat16, 40000.0, 60000.0)
    result = run_mk(["merge", "--method", "task_arithmetic", "--lambda", "1", "--base", str(paths["base"]),
                     "--sources", str(paths["a"]), str(paths["b"]), "--dtype", "fp16", "--out",
                     str(tmp_path / "out"), "--output-dir", str(tmp_path / "art")], host=HOST)
    assert result.exit_code == 1 and "exceed the range of float16" in result.stderr
    fine = run_mk(["merge", "--method", "task_arithmetic", "--lambda", "1", "--base", str(paths["base"]),
                   "--sources", str(paths["a"]), str(paths["b"]), "--out", str(tmp_path / "out"),
                   "--output-dir", str(tmp_path / "art"), "-q"], host=HOST)
    assert fine.exit_code == 0, fine.stderr  # bf16 holds 80000: the same merge in its own dtype is fine


def _methods() -> list[str]:
    return sorted(c.name for c in HOST.components("merge_method"))


@pytest.mark.parametrize("method", _methods())
def test_every_method_refuses_values_beyond_the_output_dtype(tmp_path, method):
    """fp32 inputs near 1e5 merge to about 1e5 whatever the method; fp16 holds at most 65504."""
    paths = _large_models(tmp_path, torch.float32, 1e5, 1e5)
    sources = [str(paths["a"])] if HOST.get("merge_method", method).max_sources == 1 else [str(paths["a"]),
                                                                                          str(paths["b"])]
    result = run_mk(["merge", "--method", method, "--base", str(paths["base"]), "--sources", *sources,
                     "--dtype", "fp16", "--out", str(tmp_path / "out"),
                     "--output-dir", str(tmp_path / "art")], host=HOST)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "model.norm.weight" in result.stderr and "float16" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_an_adapter_output_beyond_its_dtype_is_an_error(tmp_path, models, lora_adapters):
    adapters, _ = lora_adapters
    big = tmp_path / "big"
    big.mkdir()
    factors = {k: v * 1e6 for k, v in load_file(adapters["a"] / "adapter_model.safetensors").items()}
    save_file(factors, str(big / "adapter_model.safetensors"))
    (big / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    result = run_mk(["merge", "--method", "task_arithmetic", "--adapters", str(big), str(adapters["b"]),
                     "--dtype", "fp16", "--out", str(tmp_path / "out"), "--output-dir", str(tmp_path / "art")],
                    host=HOST)
    assert result.exit_code == 1 and "float16" in result.stderr and "lora_" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- item 9: permissions

PERMISSION_SCRIPT = """
import os, sys
os.umask(int(sys.argv[1], 8))
from mergekit_core.cli import main
from mergekit_core.testing import fresh_host
main(sys.argv[2:], host=fresh_host(entry_points=True))
"""


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, models, lora_adapters, mask):
    paths, _ = models
    adapters, _ = lora_adapters
    runs = {
        "model": [*_pool_args(paths), "--method", "task_arithmetic"],
        "adapter": ["--adapters", str(adapters["a"]), str(adapters["b"]), "--method", "task_arithmetic"],
    }
    for kind, args in runs.items():
        out = tmp_path / kind
        done = subprocess.run([sys.executable, "-c", PERMISSION_SCRIPT, oct(mask)[2:], "merge", *args, "--out",
                               str(out), "--output-dir", str(tmp_path / "art"), "-q"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        written = [out, *out.rglob("*"), *(tmp_path / "art").rglob("*")]
        assert any(p.name.endswith(".safetensors") for p in written)
        for p in written:
            expected = (0o777 if p.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(os.stat(p).st_mode) == expected, (p, oct(os.stat(p).st_mode))


# --------------------------------------------------------------------------- never, even with --force


def test_force_never_replaces_home_the_working_directory_or_a_repository(tmp_path, models):
    """A tester's `--out ~ --force` once replaced a whole home directory: some folders are never
    replaced, whatever the flags say."""
    paths, _ = models
    home = _user_folder(tmp_path / "home" / "me")
    repo = _user_folder(tmp_path / "repo")
    (repo / ".git").mkdir()
    work = _user_folder(tmp_path / "projects" / "work")
    before = {p: _tree(p) for p in (home, repo, work)}
    cases = [(home, "your home directory"), (home.parent, "contains your home directory"),
             (repo, "a git repository"), (work, "the working directory"),
             (work.parent, "contains the working directory")]
    for out, why in cases:
        done = subprocess.run(
            [sys.executable, "-c", PERMISSION_SCRIPT, "022", "merge", "--method", "task_arithmetic",
             *_pool_args(paths), "--out", str(out), "--output-dir", str(tmp_path / "art"), "--force"],
            capture_output=True, text=True, cwd=work, env={**os.environ, "HOME": str(home)})
        assert done.returncode == 2, (out, done.stderr)
        assert why in done.stderr and "even with --force" in done.stderr and "Traceback" not in done.stderr
    assert {p: _tree(p) for p in (home, repo, work)} == before
    ok = _user_folder(tmp_path / "elsewhere")
    assert _merge([*_pool_args(paths), "--out", str(ok), "--output-dir", str(tmp_path / "art"),
                   "--force"]).exit_code == 0


def test_a_run_bundle_or_an_artifact_is_not_a_previous_output_a_model_may_replace(tmp_path, models):
    paths, _ = models
    art = tmp_path / "art"
    first = run_mk(["merge", "--method", "task_arithmetic", *_pool_args(paths), "--output-dir", str(art), "--json"],
                   host=HOST)
    run_dir = Path(json.loads(first.stdout)["run_dir"])
    before = _tree(run_dir)
    refused = _merge([*_pool_args(paths), "--out", str(run_dir), "--output-dir", str(tmp_path / "art2")])
    _assert_one_line_error(refused, "it holds a run bundle, not a model mk may replace")
    assert _tree(run_dir) == before
    artifact = tmp_path / "artifact"
    compress = ["svd-hybrid", "compress", "--base", str(paths["base"]), str(paths["ft1"]), str(paths["ft2"]), "-q"]
    assert run_mk([*compress, "--out", str(artifact)], host=HOST).exit_code == 0
    refused = _merge([*_pool_args(paths), "--out", str(artifact), "--output-dir", str(art)])
    _assert_one_line_error(refused, "svd hybrid artifact")
    model = tmp_path / "model"
    assert _merge([*_pool_args(paths), "--out", str(model), "--output-dir", str(art)]).exit_code == 0
    _assert_one_line_error(run_mk([*compress, "--out", str(model)], host=HOST), "holds a model")


def test_a_file_above_the_output_is_one_clear_error(tmp_path, models):
    paths, _ = models
    (tmp_path / "plain").write_text("x")
    result = _merge([*_pool_args(paths), "--out", str(tmp_path / "plain" / "sub"), "--output-dir", str(tmp_path / "a")])
    _assert_one_line_error(result, "is a file, so no folder can be made inside it")


def test_force_says_what_it_will_replace_before_it_does_even_when_quiet(tmp_path, models):
    paths, _ = models
    folder = _user_folder(tmp_path / "mine")
    result = _merge([*_pool_args(paths), "--out", str(folder), "--output-dir", str(tmp_path / "a"), "--force"])
    assert result.exit_code == 0, result.stderr
    assert "warning: --force: 2 entries of" in result.stderr and "notes.txt" in result.stderr


def test_force_never_replaces_a_folder_holding_a_repository_or_the_config_in_use(tmp_path, models):
    paths, _ = models
    parent = _user_folder(tmp_path / "parent")
    (parent / "child" / ".git").mkdir(parents=True)
    before = _tree(parent)
    result = _merge([*_pool_args(paths), "--out", str(parent), "--output-dir", str(tmp_path / "a"), "--force"])
    _assert_one_line_error(result, "holds a git repository", "child")
    assert _tree(parent) == before
    folder = _user_folder(tmp_path / "cfgdir")
    config = folder / "m.yaml"
    config.write_text(f"base_model: {paths['base']}\nsources: [{paths['ft1']}, {paths['ft2']}]\n"
                      f"method: task_arithmetic\noutput: {{path: {folder}}}\noutput_dir: {tmp_path / 'a'}\n")
    result = run_mk(["merge", str(config), "--force"], host=HOST)
    _assert_one_line_error(result, "contains the input", "m.yaml")
    assert config.is_file()


def test_a_dry_run_with_force_says_what_would_be_replaced(tmp_path, models):
    paths, _ = models
    folder = _user_folder(tmp_path / "mine")
    result = _merge([*_pool_args(paths), "--out", str(folder), "--output-dir", str(tmp_path / "a"), "--force",
                     "--dry-run"])
    assert result.exit_code == 0 and "2 entries of" in result.stderr and "would be replaced" in result.stderr
    assert (folder / "notes.txt").is_file()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # the fused path and the general one
def test_values_too_small_for_the_output_dtype_are_counted_and_said(tmp_path, method):
    tiny = {"base": 0.0, "a": 2e-9, "b": 4e-9}  # merged 3e-9 (task arithmetic, lambda 0.5): below fp16's 6e-8
    for name, value in tiny.items():
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": torch.full((4, 8), value),
                   "model.norm.weight": torch.ones(8) * (1 + value * 1e8)}, str(tmp_path / name / "model.safetensors"))
    keep_all = ["--param", "k=100"] if method == "ties" else []  # no trimming: every entry reaches the output
    result = run_mk(["merge", "--method", method, "--lambda", "0.5", *keep_all, "--base", str(tmp_path / "base"),
                     "--sources", str(tmp_path / "a"), str(tmp_path / "b"), "--dtype", "fp16", "--out",
                     str(tmp_path / "out"), "--output-dir", str(tmp_path / "art"), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    meta = json.loads((Path(summary["run_dir"]) / "merge_metadata.json").read_text())
    assert meta["report"]["flushed_to_zero"] == {"model.layers.0.mlp.up_proj.weight": 32}
    assert any("32 merged values in 1 tensors were too small" in w for w in summary["warnings"])
    assert (load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"] == 0).all()
