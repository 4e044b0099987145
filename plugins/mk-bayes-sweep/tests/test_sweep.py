"""``mk sweep`` with ``search.type: bayes`` on real merges of small models, scored by a real
(cheap) evaluator: summaries, reproducibility, warm start, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy
import yaml

from mergekit_core.api import MergeConfig, run_sweep
from mergekit_core.testing import run_mk


def write(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_bayes_sweep_records_every_point_the_best_and_the_gp_predictions(sweep_config, host):
    toy.CALLS.clear()
    result = run_sweep(MergeConfig.from_dict(sweep_config()), host)
    points = result["points"]
    assert len(points) == 8 and len({json.dumps(p["point"]) for p in points}) == 8
    phases = [p["proposal"]["phase"] for p in points]
    assert phases == ["init"] * 3 + ["gp"] * 5
    for p in points[3:]:
        assert p["proposal"]["sd"] >= 0 and isinstance(p["proposal"]["mean"], float)
    assert result["best"]["score"] == max(p["score"] for p in points)
    assert result["search"]["type"] == "bayes" and result["bayes"]["proposed"] == 8
    # three tasks per merged point, plus each task's own model once (cached afterwards)
    assert toy.CALLS == {"ft1": 9, "ft2": 9, "ft3": 9}
    saved = json.loads(Path(result["path"]).read_text())
    assert saved["points"][5]["proposal"] == points[5]["proposal"] and saved["merge_mode"] == "common"


def test_a_seeded_sweep_is_reproducible(sweep_config, host, tmp_path):
    first = run_sweep(MergeConfig.from_dict(sweep_config()), host)
    again = run_sweep(MergeConfig.from_dict(sweep_config(output_dir=str(tmp_path / "other"))), host)
    assert [p["point"] for p in first["points"]] == [p["point"] for p in again["points"]]


def test_the_objective_can_be_the_mean_or_one_task(sweep_config, host):
    data = sweep_config(lambda_policy="per_task")
    data["search"].update(objective="ft2", budget=10, init_points=4,
                          space={"lambdas": {"type": "float", "min": 0.0, "max": 1.0, "size": "tasks"}})
    result = run_sweep(MergeConfig.from_dict(data), host)
    best = result["best"]
    assert best["score"] == pytest.approx(best["metrics"]["ft2"]) and result["objective"] == "ft2"
    a, b, c = best["point"]["lambdas"]
    assert b > max(a, c)  # ft2's own task vector counts most for ft2
    data["search"]["objective"] = "mean"
    mean = run_sweep(MergeConfig.from_dict(data), host)
    assert mean["best"]["score"] == pytest.approx(mean["best"]["summary"]["mean_metric"])


def test_a_batched_sweep_proposes_distinct_points_inside_the_constraint(sweep_config, host):
    data = sweep_config(constraint_nonnegative=True)
    data["search"].update(budget=7, init_points=2, batch_size=3, batch_strategy="kriging_believer",
                          space={"lambda": {"type": "float", "min": -0.5, "max": 1.0}})
    result = run_sweep(MergeConfig.from_dict(data), host)
    lambdas = [r["point"]["lambda"] for r in result["points"]]
    assert len(lambdas) == 7 == len(set(lambdas)) and min(lambdas) >= 0.0
    assert all(r["score"] is not None for r in result["points"])  # none skipped by the constraint


def test_warm_start_reuses_matching_points_and_names_the_files_it_skips(sweep_config, host, tmp_path, capsys):
    grid = sweep_config()
    grid["search"] = {"type": "grid", "grid": {"lambda": [0.0, 0.25, 0.5, 0.75, 1.0]}}
    done = run_sweep(MergeConfig.from_dict(grid), host)
    other = run_sweep(MergeConfig.from_dict({**grid, "split": "test", "output_dir": str(tmp_path / "t")}), host)
    data = sweep_config()
    data["search"].update(budget=4, init_points=4, warm_start_max_points=3,
                          warm_start_sweeps=[str(Path(done["path"]).parent), other["path"]])
    toy.CALLS.clear()
    result = run_sweep(MergeConfig.from_dict(data), host)
    warm = result["warm_start"]
    assert warm["points"] == 3 and warm["used"] == {str(Path(done["path"]).resolve()): 3}
    assert warm["skipped"] == {str(Path(other["path"]).resolve()): "split differs: 'test' there, 'validation' here"}
    assert f"warm start: skipped {Path(other['path']).resolve()}: split differs" in capsys.readouterr().err
    best3 = {r["point"]["lambda"] for r in sorted(done["points"], key=lambda r: -r["score"])[:3]}
    new = [r["point"]["lambda"] for r in result["points"]]
    assert len(new) == 4 and not best3 & set(new), "a warm-start point was evaluated again"
    # the 3 warm points stand in for 3 of the 4 design points
    assert [r["proposal"]["phase"] for r in result["points"]] == ["init"] + ["gp"] * 3
    assert sum(toy.CALLS.values()) == 4 * 3


RUNNER = """
import sys
import toy
from mergekit_core.cli import main
from mergekit_core.testing import fresh_host
from mk_bayes_sweep import plugin
main(sys.argv[1:], host=fresh_host({"bayes_sweep": plugin, "closeness": toy.plugin}))
"""


def _mk(args, env, **kw):
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_in_the_middle_then_resume_evaluates_no_point_twice(sweep_config, tmp_path):
    data = sweep_config()
    data["search"].update(budget=9, init_points=3)
    config = write(tmp_path, data)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "MK_BAYES_CALLS": str(calls), "MK_BAYES_SLOW": "0.15", "OMP_NUM_THREADS": "1"}
    proc = _mk(["sweep", str(config)], env)
    art = tmp_path / "art"
    deadline = time.time() + 120
    journal = None
    while time.time() < deadline:  # kill once five points are on disk
        journal = next(art.rglob("journal_*.jsonl"), None)
        if journal is not None and len(journal.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.kill()  # SIGKILL
    proc.communicate()
    assert journal is not None and proc.returncode == -9
    before = [json.loads(line)["point"]["lambda"] for line in journal.read_text().splitlines()]
    assert 5 <= len(before) < 9
    merged_before = sum(1 for line in calls.read_text().splitlines()) // 3
    resumed = _mk(["sweep", str(config), "--resume", "--json"], {**env, "MK_BAYES_SLOW": "0"})
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    lambdas = [r["point"]["lambda"] for r in result["points"]]
    assert lambdas[:len(before)] == before and len(lambdas) == 9 == len(set(lambdas))
    journaled = [json.loads(line)["point"]["lambda"] for line in journal.read_text().splitlines()]
    assert sorted(journaled) == sorted(lambdas), "a point was journaled twice"
    # evaluations of merged models: the killed run's (its last maybe unfinished) plus exactly the new points
    merged_after = sum(1 for line in calls.read_text().splitlines()) // 3 - 1  # minus the own models
    assert merged_after - merged_before <= 9 - len(before) + 1
    assert merged_after <= 9 + 1
    uninterrupted = run_sweep(MergeConfig.from_dict(sweep_config(output_dir=str(tmp_path / "u"),
                                                                 search={**data["search"]})), _host())
    assert [r["point"]["lambda"] for r in uninterrupted["points"]] == lambdas  # resumed = never stopped


def _host():
    from mk_bayes_sweep import plugin

    from mergekit_core.testing import fresh_host

    return fresh_host({"bayes_sweep": plugin, "closeness": toy.plugin})


BAD = [
    ({"space": {}}, "give the space to search"),
    ({"space": {"lambda": {"type": "float", "min": 1.0, "max": 0.0}}}, "search.space.lambda: min 1 is greater than max 0"),
    ({"space": {"lamda": {"type": "float", "min": 0.0, "max": 1.0}}}, "did you mean 'lambda'"),
    ({"space": {"lambda": {"type": "float", "min": float("nan"), "max": 1.0}}},
     "search.space.lambda: 'min' must be a finite number, got nan"),
    ({"budget": 3, "init_points": 5}, "budget 3 is below init_points 5"),
    ({"warm_start_sweeps": "{missing}"}, "no such file or directory"),
    ({"warm_start_sweeps": "{garbage}"}, "is not JSON"),
    ({"space": {"lambdas": {"type": "float", "min": 0.0, "max": 1.0, "size": 2}}}, "size 2 does not match the 3 sources"),
    ({"objective": "meen"}, "did you mean 'mean'"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_input_is_one_line_and_a_non_zero_exit_before_any_merge(sweep_config, host, tmp_path, change, message):
    garbage = tmp_path / "sweep_garbage.json"
    garbage.write_text("{not json")
    data = sweep_config(lambda_policy="per_task") if "lambdas" in str(change) else sweep_config()
    for key, value in change.items():
        data["search"][key] = value.format(missing=tmp_path / "nothing.json", garbage=garbage) \
            if isinstance(value, str) else value
    toy.CALLS.clear()
    result = run_mk(["sweep", str(write(tmp_path, data))], host=host)
    assert result.exit_code == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not toy.CALLS and not list((tmp_path / "art").rglob("journal_*.jsonl"))


def test_sweep_show_prints_the_points_with_their_predictions(sweep_config, host, tmp_path):
    result = run_sweep(MergeConfig.from_dict(sweep_config()), host)
    shown = run_mk(["sweep", "show", result["path"]], host=host, env={"COLUMNS": "160"})
    assert shown.exit_code == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if "lambda=" in line and line.startswith("│")]
    assert len(rows) == 8
    assert sum(" gp " in r for r in rows) == 5 and sum(" init " in r for r in rows) == 3
    assert "predicted" in shown.stdout and "best (*): lambda=" in shown.stdout
    assert rows[0].split("│")[1].strip().endswith("*")  # best first, marked
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    bad = run_mk(["sweep", "show", str(tmp_path / "x.json")], host=host)
    assert bad.exit_code == 2 and "not a sweep summary" in bad.stderr
    by_run = run_mk(["sweep", "show", result["path"], "--order", "run", "--json"], host=host)
    assert json.loads(by_run.stdout)["points"] == json.loads(Path(result["path"]).read_text())["points"]
    both = run_mk(["sweep", "show", result["path"], result["path"], "--limit", "2"], host=host)
    assert both.exit_code == 0 and both.stdout.count("best (*)") == 2 and both.stdout.count("6 more points") == 2


def test_the_png_shows_the_best_so_far_and_the_1d_gp(sweep_config, host):
    pytest.importorskip("matplotlib", reason="the PNG is written only when matplotlib is installed")
    result = run_sweep(MergeConfig.from_dict(sweep_config()), host)
    png = Path(result["plot"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_with_a_larger_budget_goes_on_from_the_same_journal(sweep_config, host, tmp_path):
    data = sweep_config()
    data["search"]["budget"] = 4
    first = run_sweep(MergeConfig.from_dict(data), host)
    data["search"]["budget"] = 6
    toy.CALLS.clear()
    more = run_sweep(MergeConfig.from_dict(data), host, resume=True)
    assert sum(toy.CALLS.values()) == 2 * 3  # only the 2 new points, on 3 tasks
    points = [p["point"] for p in more["points"]]
    assert len(points) == 6 and points[:4] == [p["point"] for p in first["points"]]
    data["output_dir"] = str(tmp_path / "straight")
    straight = run_sweep(MergeConfig.from_dict(data), host)
    assert [p["point"] for p in straight["points"]] == points  # as if it had run with 6 from the start


def test_a_space_with_fewer_points_than_the_budget_says_so(sweep_config, host, tmp_path):
    data = sweep_config()
    data["search"].update(budget=8, init_points=2,
                          space={"lambda": {"type": "categorical", "choices": [0.2, 0.5, 0.8]}})
    result = run_mk(["sweep", str(write(tmp_path, data))], host=host)
    assert result.exit_code == 0, result.stderr
    assert "warning: the search stopped after 3 of its budget of 8 points" in result.stderr
    summary = json.loads(Path(result.stdout.split("results: ")[1].split()[0]).read_text())
    assert summary["bayes"]["space_exhausted"] and len(summary["points"]) == 3
    assert summary["warnings"] == [result.stderr.split("warning: ")[1].strip()]
