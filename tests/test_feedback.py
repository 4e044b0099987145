"""Feedback on long work (issue 12, item 7): the merge bar counts tensors and bytes apart, the
preparation passes and input hashing show progress, flags do not look like they take values."""

from __future__ import annotations

import io

from rich.console import Console

from mergekit_core.cli.merge_cmd import RichProgress
from mergekit_core.config import MergeConfig
from mergekit_core.engine import run_merge
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


def test_help_shows_flags_without_a_value_type():
    for command in (["merge", "--help"], ["sweep", "--help"], ["svd-hybrid", "compress", "--help"]):
        result = run_mk(command, host=HOST, env={"COLUMNS": "160"})
        assert result.exit_code == 0
        assert "--json" in result.stdout or "--force" in result.stdout
        assert "<bool>" not in result.stdout


def test_the_merge_bar_reports_tensors_and_bytes_and_the_passes_before_it(tmp_path, models):
    paths, _ = models
    events = []
    spec = MergeConfig.from_dict({
        "base_model": str(paths["base"]), "sources": [str(paths["ft1"]), str(paths["ft2"])], "method": "ties",
        "method_params": {"trim_scope": "model"}, "output": {"path": str(tmp_path / "out")},
        "output_dir": str(tmp_path / "art")}).to_spec()
    run_merge(spec, HOST, progress=lambda event, **info: events.append((event, info)))
    kinds = [e for e, _ in events]
    phases = [info["label"] for e, info in events if e == "phase"]
    assert any(label.startswith("ties: preparing") for label in phases) and "hashing inputs" in phases
    assert kinds.index("phase") < kinds.index("start") < kinds.index("end")
    start = next(info for e, info in events if e == "start")
    tensors = [info for e, info in events if e == "tensor"]
    assert start["total"] == len(tensors) and start["total_bytes"] == sum(t["nbytes"] for t in tensors) > 0

    bar = RichProgress()
    bar.progress.live.console = Console(file=io.StringIO(), force_terminal=False)
    for event, info in events:
        bar(event, **info)
    assert bar.done == len(tensors) and bar.bytes == start["total_bytes"]
    assert f"{len(tensors)}/{len(tensors)} tensors" in bar._detail() and "B/s written" in bar._detail()
    bar.close()
