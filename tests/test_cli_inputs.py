"""Inputs that used to escape as tracebacks, found by the property tests and by review."""

from __future__ import annotations

from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


def test_an_adapter_output_from_full_models_is_one_error(tmp_path, models):
    paths, _ = models
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(paths["base"]), "--sources",
                     str(paths["ft1"]), str(paths["ft2"]), "--kind", "adapter", "--out", str(tmp_path / "o")],
                    host=HOST)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "output.kind adapter needs every source to be an adapter; ft1 is a full model" in result.stderr


def test_params_on_the_command_line_over_a_config_whose_method_params_is_not_a_mapping(tmp_path, models):
    paths, _ = models
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {paths['base']}\nsources: [{paths['ft1']}, {paths['ft2']}]\n"
                      "method: task_arithmetic\nmethod_params: 0.3\n")
    for command in (["merge", str(config), "-p", "lambda=0.2", "--dry-run"],
                    ["svd-hybrid", "compress", str(config), "-p", "energy=0.9", "--out", str(tmp_path / "a")]):
        if command[0] == "svd-hybrid":
            config.write_text(config.read_text().replace("task_arithmetic", "svd_hybrid"))
        result = run_mk(command, host=HOST)
        assert result.exit_code == 2, result.stderr
        assert "method_params must be a mapping" in result.stderr and "Traceback" not in result.stderr


def test_bad_flags_are_one_error_line_not_a_panel():
    for args, words in ((["merge", "--lambda", "abc"], "Invalid value for '--lambda'"),
                        (["merge", "--bogus"], "No such option: --bogus"),
                        (["nosuch"], "No such command 'nosuch'")):
        result = run_mk(args, host=HOST)
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("Error: ") and words in lines[0], result.stderr
        assert len(lines) == 2 and lines[1].startswith("hint: see 'mk") and "╭" not in result.stderr


def test_a_non_finite_lambda_is_a_parameter_error(tmp_path, models):
    paths, _ = models
    for value in ("nan", "inf"):
        result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(paths["base"]), "--sources",
                         str(paths["ft1"]), str(paths["ft2"]), "--lambda", value, "--out", str(tmp_path / "o")],
                        host=HOST)
        assert result.exit_code == 2 and "must be a finite number" in result.stderr


def test_a_key_written_twice_and_paths_that_are_not_text_are_config_errors(tmp_path, models):
    paths, _ = models
    config = tmp_path / "dup.yaml"
    config.write_text(f"base_model: {paths['base']}\nsources: [{paths['ft1']}, {paths['ft2']}]\n"
                      "method: task_arithmetic\nmethod: ties\n")
    result = run_mk(["merge", str(config), "--dry-run"], host=HOST)
    assert result.exit_code == 2 and "line 4 (duplicate key 'method')" in result.stderr
    config.write_text(f"base_model: {paths['base']}\nsources: [{paths['ft1']}, {paths['ft2']}]\n"
                      "method: task_arithmetic\noutput_dir: [a]\noutput: {path: 5}\n")
    result = run_mk(["merge", str(config), "--dry-run"], host=HOST)
    assert result.exit_code == 2 and "output_dir: must be a path" in result.stderr
    assert "output.path: must be a path" in result.stderr and not (tmp_path / "['a']").exists()


def test_source_count_wording_and_an_empty_out(tmp_path, models):
    paths, _ = models
    three = ["--base", str(paths["base"]), "--sources", str(paths["ft1"]), str(paths["ft2"]), str(paths["ft3"])]
    result = run_mk(["merge", "--method", "slerp", *three, "--out", str(tmp_path / "o")], host=HOST)
    assert "merge method 'slerp' takes exactly 2 sources, got 3" in result.stderr
    empty = run_mk(["merge", "--method", "uniform", *three, "--out", ""], host=HOST)
    assert empty.exit_code == 2 and "--out is empty" in empty.stderr
