"""``kill -9`` at seeded random moments and a full disk (issue 11, "Done when").

Each command runs in a subprocess and is killed at a random moment of its run (the moments are
drawn from a seeded generator, between the start and the measured length of a complete run).
After every kill: the destination holds a complete output (the previous one or the new one) or
nothing, every run bundle is whole, the sweep journal and evaluation indexes parse, and the
next run (``--resume`` for sweeps) completes and cleans what the killed one left.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

KILLS = 3
NAME = "model.layers.0.self_attn.q_proj.weight"

RUNNER = """
import sys
from mergekit_core.cli import main
from mergekit_core.testing import fresh_host
main(sys.argv[1:], host=fresh_host(entry_points=True))
"""

SWEEP_RUNNER = """
import sys, types
from pathlib import Path
import torch
from mergekit_core import Evaluator, Param, TaskInfo, hookimpl
from mergekit_core.cli import main
from mergekit_core.io.readers import SafetensorsReader
from mergekit_core.testing import fresh_host

NAME = "model.layers.0.self_attn.q_proj.weight"

class Closeness(Evaluator):
    name = "closeness"
    description = "minus the distance of one tensor to the task's own fine-tune"
    params = (Param("pool", help="models directory", type=str),)

    def tasks(self, params):
        return [TaskInfo(n, "closeness") for n in ("ft1", "ft2")]

    def labels(self, task, split, params):
        return [i % 2 for i in range(20)]

    def evaluate(self, model, task, split, subset, params):
        if not isinstance(model, dict):
            reader = SafetensorsReader.from_directory(Path(model))
            model = {NAME: reader.get(NAME)}
        own = SafetensorsReader.from_directory(Path(params["pool"]) / task).get(NAME)
        return {"closeness": -float(torch.linalg.vector_norm(model[NAME].float() - own.float()))}

plugin = types.ModuleType("closeness_plugin")
plugin.mk_evaluators = hookimpl(lambda: [Closeness()])
plugin.mk_evaluators.__name__ = "mk_evaluators"
main(sys.argv[1:], host=fresh_host({"closeness": plugin}))
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes large enough (12 x 1 MiB float32 tensors) that a merge spends
    a while reading and writing, where a kill can land."""
    root = tmp_path_factory.mktemp("crash-pool")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(512, 512, generator=g) for i in range(12)}
    paths = {}
    for name in ("base", "ft1", "ft2"):
        tensors = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = root / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
        paths[name] = d
    return paths


def _run(script: str, args: list[str], cwd: Path, kill_after: float | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script, *args]
    if kill_after is None:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode)


def _timed(script: str, args: list[str], cwd: Path) -> float:
    started = time.monotonic()
    done = _run(script, args, cwd)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


def _moments(seed: int, length: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.15, 1.0) * length for _ in range(KILLS)]


def _bundles_are_whole(root: Path) -> int:
    runs = [p for p in root.rglob("run_*") if p.is_dir() and p.parent.name == "runs"]
    for run in runs:
        assert (run / "merge_metadata.json").is_file(), f"partial run bundle {run}"
        json.loads((run / "merge_metadata.json").read_text())
    return len(runs)


def _leftovers(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if ".mk-tmp-" in p.name
            or ".mk-old-" in p.name]


def test_kill_9_during_mk_merge_never_leaves_a_partial_output(tmp_path, pool):
    out, art = tmp_path / "merged", tmp_path / "art"
    common = ["merge", "--method", "task_arithmetic", "--base", str(pool["base"]), "--sources", str(pool["ft1"]),
              str(pool["ft2"]), "--out", str(out), "--output-dir", str(art), "-q"]
    length = _timed(RUNNER, [*common, "--lambda", "0.3"], tmp_path)
    base, a, b = (load_file(pool[k] / "model.safetensors")[NAME].double() for k in ("base", "ft1", "ft2"))
    expected = {lam: base + lam * (a - base + b - base) for lam in (0.3, 0.5)}
    for moment in _moments(0, length):
        _run(RUNNER, [*common, "--lambda", "0.5"], tmp_path, kill_after=moment)
        assert out.is_dir(), "the previous output vanished"
        got = load_file(out / "model.safetensors")  # complete: every tensor readable
        assert len(got) == 12
        assert any(torch.allclose(got[NAME].double(), e, atol=1e-5) for e in expected.values())
        _bundles_are_whole(art)
    assert _run(RUNNER, [*common, "--lambda", "0.5"], tmp_path).returncode == 0
    torch.testing.assert_close(load_file(out / "model.safetensors")[NAME].double(), expected[0.5])
    assert _leftovers(tmp_path) == [], "temporaries of killed runs were not cleaned"
    assert _bundles_are_whole(art) >= 2


def test_kill_9_during_svd_hybrid_compress_never_leaves_a_partial_artifact(tmp_path, pool):
    out = tmp_path / "artifact"
    args = ["svd-hybrid", "compress", "--base", str(pool["base"]), str(pool["ft1"]), str(pool["ft2"]),
            "--out", str(out), "-q"]
    length = _timed(RUNNER, args, tmp_path)
    for moment in _moments(1, length):
        _run(RUNNER, args, tmp_path, kill_after=moment)
        verified = _run(RUNNER, ["svd-hybrid", "diagnose", str(out), "--json"], tmp_path)
        assert verified.returncode == 0, verified.stderr  # every file matches its recorded sha256
    assert _run(RUNNER, args, tmp_path).returncode == 0
    assert _leftovers(tmp_path) == []


def test_kill_9_during_mk_sweep_keeps_journal_and_index_valid_and_resume_completes(tmp_path, pool):
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    art = tmp_path / "art"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [str(pool["ft1"]), str(pool["ft2"])], "base_model": str(pool["base"]),
        "method": "task_arithmetic", "search": {"type": "grid", "grid": {"lambda": grid}},
        "evaluator": "closeness", "evaluator_params": {"pool": str(pool["base"].parent)},
        "save_merged": True, "output_dir": str(art),
    }))
    length = _timed(SWEEP_RUNNER, ["sweep", str(config)], tmp_path)
    journal = next(art.rglob("journal_*.jsonl"))
    journal.unlink()
    for moment in _moments(2, length):
        _run(SWEEP_RUNNER, ["sweep", str(config), "--resume"], tmp_path, kill_after=moment)
        if journal.exists():
            for line in journal.read_text().splitlines():
                json.loads(line)  # never a torn record
        for index in art.rglob("index.json"):
            assert isinstance(json.loads(index.read_text()), list)
        _bundles_are_whole(art)
    done = _run(SWEEP_RUNNER, ["sweep", str(config), "--resume", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["point"]["lambda"] for r in result["points"]] == grid
    assert result["best"] is not None
    points = [json.loads(line)["point"]["lambda"] for line in journal.read_text().splitlines()]
    assert sorted(points) == grid, "a point was journaled twice or lost"
    assert _leftovers(art) == []


# --------------------------------------------------------------------------- a full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, pool):
    """A 4 MiB tmpfs where the 12 MiB merge goes; where mounting is not allowed the same failure
    is injected into the shard writer (ENOSPC after 1 MiB)."""
    small = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mounted = _mount_tmpfs(small, "4m")
    try:
        args = ["merge", "--method", "task_arithmetic", "--lambda", "0.3", "--base", str(pool["base"]),
                "--sources", str(pool["ft1"]), str(pool["ft2"]), "--out", str(small / "merged"),
                "--output-dir", str(tmp_path / "art")]
        if mounted:
            done = _run(RUNNER, args, tmp_path)
        else:
            done = _run(ENOSPC_RUNNER, args, tmp_path)
        assert done.returncode == 1, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("Error: ") and "No space left on device" in lines[0], done.stderr
        assert f"Error: {small}/" in lines[0], "the line names the file that could not be written"
        assert len(lines) <= 2 and "Traceback" not in done.stderr and "free disk space" in done.stderr
        assert list(small.iterdir()) == [], "a partial output or temporary was left on the full disk"
        assert not list((tmp_path / "art").rglob("run_*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


ENOSPC_RUNNER = """
import errno, os, sys
from mergekit_core.io import writer

real_start = writer.StreamingSafetensorsWriter._start_shard

class Full:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

def start(self):
    real_start(self)
    self._open.file = Full(self._open.file)

writer.StreamingSafetensorsWriter._start_shard = start
from mergekit_core.cli import main
from mergekit_core.testing import fresh_host
main(sys.argv[1:], host=fresh_host(entry_points=True))
"""


def test_an_injected_enospc_gives_one_line_and_leaves_nothing(tmp_path, pool):
    """The same as a full tmpfs, on any machine: the shard writer fails with ENOSPC after 1 MiB."""
    out = tmp_path / "merged"
    done = _run(ENOSPC_RUNNER, ["merge", "--method", "task_arithmetic", "--lambda", "0.3", "--base",
                                str(pool["base"]), "--sources", str(pool["ft1"]), str(pool["ft2"]),
                                "--out", str(out), "--output-dir", str(tmp_path / "art")], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and "No space left on device" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and _leftovers(tmp_path) == []
    assert not list((tmp_path / "art").rglob("run_*"))


SIGTERM_RUNNER = """
import os, signal, sys, time
from mergekit_core.io import writer

real_write = writer.StreamingSafetensorsWriter.write

def write(self, name, tensor):
    real_write(self, name, tensor)
    if self._next == 2:  # the merge is under way: stopped as a scheduler stops a job
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)

writer.StreamingSafetensorsWriter.write = write
from mergekit_core.cli import console_main
console_main()
"""


def test_sigterm_during_mk_merge_stops_cleanly(tmp_path, pool):
    """SIGTERM (not SIGKILL) lets mk clean up as Ctrl-C does: one line, status 143, no output, no
    hidden temporary, no run bundle."""
    out = tmp_path / "merged"
    done = _run(SIGTERM_RUNNER, ["merge", "--method", "task_arithmetic", "--lambda", "0.3", "--base", str(pool["base"]),
                                 "--sources", str(pool["ft1"]), str(pool["ft2"]), "--out", str(out),
                                 "--output-dir", str(tmp_path / "art")], tmp_path)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "Terminated." and "Traceback" not in done.stderr
    assert not out.exists() and _leftovers(tmp_path) == []
    assert not list((tmp_path / "art").rglob("run_*"))
