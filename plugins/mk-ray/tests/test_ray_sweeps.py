"""Sweeps through the ``ray`` executor on a real local Ray cluster (no mock): the same results as
the local executor for a grid and a bayes search, a worker killed mid-trial retried, a failing
trial recorded while the sweep goes on, an impossible resource request refused at once, Ctrl-C
leaving a journal that resumes, and ``address: local`` starting and removing a private cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mergekit_core.api import MergeConfig, run_sweep
from mergekit_core.testing import run_mk

pytest.importorskip("ray", reason="mk-ray's tests need ray: pip install -e 'plugins/mk-ray[test]'")
pytestmark = pytest.mark.usefixtures("ray_cluster")
HERE = Path(__file__).parent


def config(pool, out: Path, search: dict, executor: dict | None = None, **extra) -> MergeConfig:
    data = {"sources": [str(pool[t]) for t in ("ft1", "ft2", "ft3")], "base_model": str(pool["base"]),
            "method": "task_arithmetic", "evaluator": "closeness",
            "evaluator_params": {"pool": str(pool["base"].parent)}, "split": "validation",
            "output_dir": str(out), "search": search, **extra}
    if executor is not None:
        data["executor"] = executor
    return MergeConfig.from_dict(data)


GRID = {"type": "grid", "grid": {"lambda": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}}
BAYES = {"type": "bayes", "budget": 6, "init_points": 3, "seed": 1,
         "space": {"lambda": {"type": "float", "min": 0.0, "max": 1.0}}}


def journal(out: Path) -> list[dict]:
    """The records of the sweep journals under ``out`` (one JSON line each)."""
    return [json.loads(line) for path in sorted(out.rglob("journal_*.jsonl")) for line in path.read_text().splitlines()]


def by_point(result):
    return {json.dumps(r["point"], sort_keys=True): (r["score"], r["metrics"]) for r in result["points"]}


def test_a_grid_sweep_on_two_parallel_trials_gives_the_local_results(toy_pool, host, tmp_path):
    local = run_sweep(config(toy_pool, tmp_path / "local", GRID), host)
    running = []
    remote = run_sweep(config(toy_pool, tmp_path / "ray", GRID, {"name": "ray", "params": {"max_concurrent": 2}}),
                       host, progress=lambda event, **info: running.append(info.get("running", 0)))
    assert by_point(remote) == by_point(local) and len(remote["points"]) == 6
    assert remote["best"]["point"] == local["best"]["point"] and remote["failed"] == 0
    assert max(running) == 2  # two trials in flight at once
    assert {r["worker"]["pid"] for r in remote["points"]} - {os.getpid()}  # run by Ray's workers
    assert remote["executor"] == {"name": "ray", "params": {**remote["executor"]["params"], "max_concurrent": 2}}
    # the driver wrote the index: one entry per point and one per task's own model
    index = Path(remote["journal"]).parents[1] / "eval" / "index.json"
    kinds = [e["kind"] for e in json.loads(index.read_text())]
    assert kinds.count("merged") == 6 and kinds.count("individual") == 3


def test_a_bayes_sweep_through_ray_proposes_and_scores_as_the_local_one(toy_pool, host, tmp_path):
    local = run_sweep(config(toy_pool, tmp_path / "local", BAYES), host)
    one = run_sweep(config(toy_pool, tmp_path / "one", BAYES, {"name": "ray", "params": {"max_concurrent": 1}}),
                    host)
    assert [(r["point"], r["score"], r["proposal"]) for r in one["points"]] == \
        [(r["point"], r["score"], r["proposal"]) for r in local["points"]]
    two = run_sweep(config(toy_pool, tmp_path / "two", BAYES, {"name": "ray", "params": {"max_concurrent": 2}}),
                    host)
    points = [r["point"]["lambda"] for r in two["points"]]
    assert len(points) == 6 == len(set(points)) and all(r["score"] is not None for r in two["points"])
    assert [p["proposal"]["phase"] for p in two["points"]].count("gp") == 3  # batches of GP proposals


def test_a_worker_killed_in_the_middle_of_a_trial_is_retried_and_the_sweep_completes(toy_pool, host, tmp_path):
    marker = tmp_path / "hanging.pid"
    cfg = config(toy_pool, tmp_path / "out", GRID, {"name": "ray", "params": {"max_concurrent": 2, "retries": 1}},
                 evaluator_params={"pool": str(toy_pool["base"].parent), "hang_once": str(marker)})

    def kill_when_hanging():
        deadline = time.time() + 60
        while time.time() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_hanging)
    killer.start()
    result = run_sweep(cfg, host)
    killer.join()
    assert not Path(f"/proc/{marker.read_text()}").exists()  # that worker is gone
    assert len(result["points"]) == 6 and result["failed"] == 0
    assert by_point(result) == by_point(run_sweep(config(toy_pool, tmp_path / "local", GRID), host))


def test_a_trial_that_always_fails_is_recorded_and_the_sweep_goes_on(toy_pool, host, tmp_path):
    search = {"type": "grid", "grid": {"lambda": [0.2, "oops", 0.6]}}
    result = run_sweep(config(toy_pool, tmp_path / "out", search, {"name": "ray", "params": {"retries": 2}}), host)
    failed = [r for r in result["points"] if r.get("error")]
    assert result["failed"] == 1 and len(failed) == 1 and failed[0]["point"] == {"lambda": "oops"}
    assert failed[0]["attempts"] == 3 and failed[0]["score"] is None
    assert failed[0]["error"].endswith("parameter 'lambda' must be float, got 'oops'")
    assert "\n" not in failed[0]["error"]
    assert sorted(r["point"]["lambda"] for r in result["points"] if not r.get("error")) == [0.2, 0.6]
    assert result["best"]["point"]["lambda"] in (0.2, 0.6)
    assert [r["point"]["lambda"] for r in journal(tmp_path / "out") if r.get("error")] == ["oops"]


def test_gpu_trials_get_their_own_device_and_a_fresh_process_each(toy_pool, host, tmp_path):
    search = {"type": "grid", "grid": {"lambda": [0.2, 0.4, 0.6, 0.8]}}
    result = run_sweep(config(toy_pool, tmp_path / "gpu", search, {"name": "ray", "params": {"num_gpus": 1}}), host)
    workers = [r["worker"] for r in result["points"]]
    assert {w["cuda_visible_devices"] for w in workers} <= {"0", "1"}  # one logical GPU each
    assert len({w["pid"] for w in workers}) == 4  # max_calls=1: GPU memory goes back after each trial
    assert by_point(result) == by_point(run_sweep(config(toy_pool, tmp_path / "local", search), host))


def test_an_unsatisfiable_resource_request_fails_fast_with_one_line(toy_pool, host, tmp_path):
    cfg = config(toy_pool, tmp_path / "out", GRID, {"name": "ray", "params": {"num_gpus": 3}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg.data))
    t0 = time.time()
    result = run_mk(["sweep", str(path)], host=host)
    assert time.time() - t0 < 30
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "asks for 1 CPU and 3 GPU" in lines[0] and "(the largest: 2 CPU, 2 GPU)" in lines[0]
    assert not journal(tmp_path / "out")  # nothing ran


def test_ctrl_c_cancels_the_running_trials_and_the_journal_resumes(toy_pool, host, tmp_path):
    cfg = config(toy_pool, tmp_path / "out", GRID, {"name": "ray", "params": {"max_concurrent": 2}})

    def interrupt_after_two(event, **info):
        if event == "point":
            interrupt_after_two.seen += 1
            if interrupt_after_two.seen == 2:
                raise KeyboardInterrupt

    interrupt_after_two.seen = 0
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, host, progress=interrupt_after_two)
    assert len(journal(tmp_path / "out")) == 2
    result = run_sweep(cfg, host, resume=True)
    assert sorted(r["point"]["lambda"] for r in result["points"]) == GRID["grid"]["lambda"]
    assert len(journal(tmp_path / "out")) == 6  # the two finished points were not run again


def test_address_local_starts_a_private_cluster_on_loopback_and_removes_it(toy_pool, tmp_path):
    cfg = config(toy_pool, tmp_path / "out", {"type": "grid", "grid": {"lambda": [0.3, 0.7]}},
                 {"name": "ray", "params": {"cluster_cpus": 1}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg.data))
    before = {p.name for p in Path("/tmp").glob("mk-ray-*")}
    code = ("import sys, mkray_toy; from mergekit_core.cli import main; "
            "from mergekit_core.testing import fresh_host; from mk_ray import plugin; "
            "main(sys.argv[1:], host=fresh_host({'mk_ray': plugin, 'mkray_toy': mkray_toy}))")
    env = {**os.environ, "PYTHONPATH": str(HERE), "HOME": str(tmp_path / "home")}
    for key in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)  # the executor sets them itself
    (tmp_path / "home").mkdir()
    done = subprocess.run([sys.executable, "-c", code, "sweep", str(path), "--json"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["points"]) == 2 and result["failed"] == 0
    assert {p.name for p in Path("/tmp").glob("mk-ray-*")} == before  # its temp folder removed
    assert not any((tmp_path / "home").iterdir())  # nothing written into the user's home


def test_runtime_env_reaches_the_trials_and_a_plain_iterable_is_enough():
    from mk_ray.executor import RayExecutor

    executor = RayExecutor()
    params = executor.resolve_params({"runtime_env": {"env_vars": {"MK_RAY_PROBE": "yes"}}, "max_concurrent": 2})
    out = executor.map(lambda item: (item, os.environ.get("MK_RAY_PROBE")), iter(range(5)), params)
    assert sorted(out) == [(i, "yes") for i in range(5)]
