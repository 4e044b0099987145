"""Hugging Face Hub model IDs as sources, base and `mk inspect` targets, resolved from a cache
directory built by the test in the layout huggingface_hub uses, offline: no test touches the
network. The expected merge is a float64 hand computation on the same tensors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

RUNNER = """
import sys
from mergekit_core.cli import main
from mergekit_core.testing import fresh_host
main(sys.argv[1:], host=fresh_host())
"""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hf_home: Path, repo_id: str, folder: Path, revision: str = "main") -> None:
    """Put ``folder``'s files into the cache as huggingface_hub stores a download of ``repo_id``."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in folder.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(COMMIT)


def mk(args: list[str], hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_hub_ids_merge_like_local_paths_and_a_missing_id_is_one_line(tmp_path, models):
    paths, tensors = models
    hf_home = tmp_path / "hf"
    cache_model(hf_home, "some-org/tiny-base", paths["base"])
    cache_model(hf_home, "some-org/tiny-ft1", paths["ft1"])
    cache_model(hf_home, "some-org/tiny-ft2", paths["ft2"], revision="v1")
    work = tmp_path / "work"
    work.mkdir()
    result = mk(["merge", "--method", "task_arithmetic", "--base", "some-org/tiny-base", "--sources",
                 "some-org/tiny-ft1", "some-org/tiny-ft2@v1", "--lambda", "0.5", "--out", str(tmp_path / "out"),
                 "--output-dir", str(tmp_path / "art"), "--json"], hf_home, work)
    assert result.returncode == 0, result.stderr
    name = "model.layers.0.self_attn.q_proj.weight"
    b, a1, a2 = (tensors[k][name].double() for k in ("base", "ft1", "ft2"))
    merged = load_file(tmp_path / "out" / "model.safetensors")[name].double()
    torch.testing.assert_close(merged, b + 0.5 * (a1 - b + a2 - b))
    run = Path(json.loads(result.stdout)["run_dir"])
    sources = [s["name"] for s in json.loads((run / "merge_metadata.json").read_text())["sources"]]
    assert sources == ["tiny-ft1", "tiny-ft2"]

    shown = mk(["inspect", "some-org/tiny-ft1", "--json"], hf_home, work)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["tensors"] > 0

    missing = mk(["merge", "--method", "uniform", "--sources", "some-org/absent", "some-org/tiny-ft1",
                  "--out", str(tmp_path / "o2"), "--output-dir", str(tmp_path / "art")], hf_home, work)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "some-org/absent: not in the Hugging Face cache" in missing.stderr

    local = work / "some-org" / "tiny-ft1"  # a local folder of the same spelling wins
    shutil.copytree(paths["ft2"], local)
    shown = mk(["inspect", "some-org/tiny-ft1", "--json"], hf_home, work)
    assert json.loads(shown.stdout)["path"] == "some-org/tiny-ft1"
