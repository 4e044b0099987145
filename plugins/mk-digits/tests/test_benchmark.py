"""`mk digits bench` on the session's quick pool: the benchmark's health, tuning, rows and outputs."""

from __future__ import annotations

import json
import types

import pytest
from mk_digits.benchmark import (
    grid_points,
    markdown,
    parse_seeds,
    run_benchmark,
    write_outputs,
)

from mergekit_core import MergeMethod, Param, UsageError, hookimpl
from mergekit_core.testing import fresh_host, run_mk


class ListMethod(MergeMethod):
    """A third-party method that breaks the contract: it returns a list."""

    name = "returns_a_list"
    description = "broken on purpose"

    def merge(self, group, params, state=None):
        return [x.tolist() for x in group.tensors]


class ScaledMean(MergeMethod):
    """A third-party method that declares its own benchmark grid."""

    name = "scaled_mean"
    description = "scale times the mean task vector"
    params = (Param("scale", 1.0, "factor on the mean task vector", type=float),)
    benchmark_grid = {"scale": [0.0, 2.4]}

    def merge(self, group, params, state=None):
        return params["scale"] * sum(group.tensors) / len(group.tensors)


def _plugin(*methods):
    module = types.ModuleType("third_party")
    module.mk_merge_methods = hookimpl(lambda: list(methods))
    module.mk_merge_methods.__name__ = "mk_merge_methods"
    return module


@pytest.fixture(scope="module")
def report(bench_dir):
    host = fresh_host({"third": _plugin(ListMethod(), ScaledMean())}, entry_points=True)
    return run_benchmark(bench_dir, host, seeds=[0], quick=True, log=lambda m: None,
                         methods=["uniform", "task_arithmetic", "scaled_mean", "returns_a_list"])


def test_grid_points_come_from_the_component():
    assert grid_points(ScaledMean()) == [{"scale": 0.0}, {"scale": 2.4}]
    assert grid_points(ListMethod()) == [{}]  # no grid, no lambda: the defaults only
    host = fresh_host(entry_points=True)
    ta = host.get("merge_method", "task_arithmetic")
    assert [p["lambda"] for p in grid_points(ta)] == ta.benchmark_grid["lambda"]
    ties = host.get("merge_method", "ties")
    assert len(grid_points(ties)) == len(ties.benchmark_grid["k"]) * len(ties.benchmark_grid["lambda"])


def test_benchmark_health(report):
    """Not the rankings: the regime the benchmark is built for (far tasks start low, fine-tunes
    reach high, task arithmetic's lambda has an interior optimum)."""
    rows = {r["method"]: r for r in report["rows"]}
    zero, tuned = rows["zero-shot"], rows["fine-tuned"]
    assert zero["per_task"]["rotated"] < 55 and zero["per_task"]["inverted"] < 55
    assert tuned["test"]["mean"] > 85
    curve = [g["validation"] for g in rows["task_arithmetic"]["grid"]]
    best = curve.index(max(curve))
    assert 0 < best < len(curve) - 1, curve
    assert zero["test"]["mean"] < rows["task_arithmetic"]["test"]["mean"] < tuned["test"]["mean"]


def test_selection_by_validation_and_the_rows(report):
    rows = {r["method"]: r for r in report["rows"]}
    assert [r["method"] for r in report["rows"]][:2] == ["zero-shot", "fine-tuned"]
    ta = rows["task_arithmetic"]
    best = max(ta["grid"], key=lambda g: g["validation"])
    assert ta["params"] == best["params"] and ta["validation"] == best["validation"]
    assert ta["vs_task_arithmetic"]["mean"] == 0.0 and ta["at_grid_edge"] == []
    uniform = rows["uniform"]
    assert uniform["params"] == {} and len(uniform["grid"]) == 1
    assert uniform["vs_task_arithmetic"]["mean"] == pytest.approx(uniform["test"]["mean"] - ta["test"]["mean"])
    # the third-party grid was used: scale 0 is the pretrained backbone, so 2.4 wins on validation
    scaled = rows["scaled_mean"]
    assert scaled["params"] == {"scale": 2.4}
    assert scaled["grid"][0]["test"] == pytest.approx(rows["zero-shot"]["test"]["mean"], abs=1e-6)
    failed = rows["returns_a_list"]
    assert "returned a list for tensor" in failed["error"] and "not a torch.Tensor" in failed["error"]
    assert rows["task_arithmetic"]["clip_b32"] == 69.1 and rows["scaled_mean"]["clip_b32"] is None
    assert rows["fine-tuned"]["normalized"]["mean"] == pytest.approx(100.0)
    assert ta["test"]["sd"] is None  # one seed: no spread claimed


def test_outputs(report, tmp_path):
    paths, note = write_outputs(report, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert data["rows"][2]["method"] == report["rows"][2]["method"] and data["seeds"] == [0]
    text = paths[1].read_text()
    assert text == markdown(report) and "| task_arithmetic |" in text and "| returns_a_list | – | failed" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert note and "matplotlib" in note and len(paths) == 2
    else:
        assert note is None and paths[2].suffix == ".png" and paths[2].stat().st_size > 1000


def test_bench_command(bench_dir):
    result = run_mk(["digits", "bench", "--out", str(bench_dir), "--quick", "--method", "uniform", "--json"],
                    host=fresh_host(entry_points=True))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["method"] for r in data["rows"]] == ["zero-shot", "fine-tuned", "uniform"]
    assert (bench_dir / "digits-benchmark" / "digits_benchmark.json").is_file()
    bad = run_mk(["digits", "bench", "--out", str(bench_dir), "--seeds", "0,x"], host=fresh_host(entry_points=True))
    assert bad.exit_code == 2 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run_mk(["digits", "bench", "--out", str(bench_dir), "--quick", "--method", "unifrom"],
                     host=fresh_host(entry_points=True))
    assert unknown.exit_code == 2 and "unknown merge method(s) unifrom" in unknown.stderr


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "1,1", "a"):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_a_choice_at_the_grid_edge_is_flagged():
    from mk_digits.benchmark import _at_edge

    points = [{"k": k, "lambda": lam} for k in (20, 40) for lam in (0.2, 0.3, 0.4)]
    assert _at_edge(points, {"k": 40, "lambda": 0.4}) == ["lambda"]  # k has only two values
    assert _at_edge(points, {"k": 20, "lambda": 0.3}) == []
