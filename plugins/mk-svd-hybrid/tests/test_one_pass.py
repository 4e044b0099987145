"""`mk merge --method svd_hybrid` reads the sources once, merges what the two-pass path merged,
and leaves nothing behind when it fails; the codec in column blocks."""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from mk_svd_hybrid import plugin
from mk_svd_hybrid.codec import CodecSettings, Decoder, encode
from mk_svd_hybrid.pipeline import compress, merged_delta
from mk_svd_hybrid.store import ArtifactReader
from safetensors.torch import load_file, save_file

from mergekit_core import Format, hookimpl
from mergekit_core.api import MergeConfig, SafetensorsReader, prepare_context
from mergekit_core.testing import fresh_host, run_mk, write_fine_tunes

SHAPES = {"embed.weight": (40, 16), "layers.0.up_proj.weight": (16, 24), "layers.0.conv.weight": (8, 4, 3),
          "norm.weight": (16,)}
MARKER = "COUNTED"


class CountingReader:
    """A safetensors model directory whose every ``get`` is counted in ``reads[(path, name)]``."""

    def __init__(self, path: Path, reads: Counter) -> None:
        self._inner = SafetensorsReader.from_directory(path)
        self._path = path
        self._reads = reads

    def get(self, name: str) -> torch.Tensor:
        self._reads[(self._path.name, name)] += 1
        return self._inner.get(name)

    def __getattr__(self, attr: str):
        return getattr(self._inner, attr)


class CountingFormat(Format):
    name = "counted_safetensors"
    description = "Safetensors model directories marked for counting (tests)."
    priority = 100

    def __init__(self, reads: Counter) -> None:
        self.reads = reads

    def sniff(self, path: Path) -> bool:
        return path.is_dir() and (path / MARKER).is_file()

    def open(self, path: Path) -> CountingReader:
        return CountingReader(path, self.reads)


class CountingPlugin:
    def __init__(self) -> None:
        self.reads: Counter = Counter()

    @hookimpl
    def mk_formats(self):
        return [CountingFormat(self.reads)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base and three fine-tunes (the base plus 5% noise), bf16."""
    root = tmp_path_factory.mktemp("svd-one-pass")
    for d in write_fine_tunes(root, SHAPES, ("base", "a", "b", "c"), scale=0.05, seed=5,
                              config={"model_type": "llama"}).values():
        (d / MARKER).write_text("")
    return root


def _merge(host, models: Path, out: Path, *params: str):
    words = [w for p in params for w in ("--param", p)]
    return run_mk(["merge", "--method", "svd_hybrid", "--base", str(models / "base"), "--sources",
                   *(str(models / s) for s in "abc"), *words, "--out", str(out),
                   "--output-dir", str(out.parent / "runs"), "--quiet"], host=host)


@pytest.mark.parametrize(("params", "reads"), [([], 1), (["weighting=cluster"], 2)])
def test_a_merge_reads_each_source_tensor_once(models, tmp_path, params, reads):
    """Cluster weighting keeps its one statistics pass (the tasks' Gram matrix) before merging."""
    counting = CountingPlugin()
    host = fresh_host({"svd_hybrid": plugin, "counting": counting})
    result = _merge(host, models, tmp_path / "out", *params)
    assert result.exit_code == 0, result.stderr
    expected = {(s, n): reads for s in "abc" for n in SHAPES}
    assert {k: v for k, v in counting.reads.items() if k[0] != "base"} == expected
    assert {counting.reads[("base", n)] for n in SHAPES} == {reads}


def two_pass_reference(host, models: Path, params: dict, work: Path) -> dict[str, torch.Tensor]:
    """What the merge wrote before it read once: compress every tensor into an artifact, then
    rebuild base + merged delta from the stored records."""
    spec = MergeConfig.from_dict({"base_model": str(models / "base"), "method": "svd_hybrid",
                                  "method_params": params, "sources": [str(models / s) for s in "abc"],
                                  "output_dir": str(work / "runs")}).to_spec()
    (work / "artifact").mkdir(parents=True)
    with prepare_context(spec, host) as (context, comps):
        compress(context, comps.params, work / "artifact")
    reader = ArtifactReader(work / "artifact")
    base = load_file(str(models / "base" / "model.safetensors"))
    out = {}
    for name, x in base.items():
        delta = merged_delta(reader, name, reader.manifest["tensors"][name]["coefficients"], tuple(x.shape))
        out[name] = delta.add_(x.float()).to(x.dtype)
    return out


@pytest.mark.parametrize("params", [{}, {"weighting": "cluster", "noise": "mean"},
                                    {"mask": "none", "quant": "residual", "block_mb": 1}])
def test_the_one_pass_merge_is_the_two_pass_merge(models, tmp_path, params):
    host = fresh_host({"svd_hybrid": plugin})
    reference = two_pass_reference(host, models, params, tmp_path / "ref")
    words = [f"{k}={v}" for k, v in params.items()]
    result = _merge(host, models, tmp_path / "merged", *words, f"artifact_dir={tmp_path / 'art'}")
    assert result.exit_code == 0, result.stderr
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged.keys() == reference.keys()
    for name in merged:
        assert torch.equal(merged[name], reference[name]), name
    kept = load_file(str(tmp_path / "art" / "records-00001.safetensors"))  # the artifact it kept ...
    stored = load_file(str(tmp_path / "ref" / "artifact" / "records-00001.safetensors"))
    assert kept.keys() == stored.keys() and all(torch.equal(kept[k], stored[k]) for k in kept)
    rebuilt = tmp_path / "rebuilt"  # ... rebuilds the same model
    out = run_mk(["svd-hybrid", "reconstruct", str(tmp_path / "art"), "--base", str(models / "base"),
                  "--out", str(rebuilt), "--quiet"], host=host)
    assert out.exit_code == 0, out.stderr
    again = load_file(str(rebuilt / "model.safetensors"))
    assert all(torch.equal(again[n], merged[n]) for n in merged)


def test_no_temporary_artifact_and_nothing_left_when_a_merge_fails(models, tmp_path, monkeypatch):
    host = fresh_host({"svd_hybrid": plugin})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ok = _merge(host, models, tmp_path / "ok")
    assert ok.exit_code == 0, ok.stderr
    assert list(scratch.iterdir()) == []  # no temporary artifact without artifact_dir

    bad = tmp_path / "bad"  # norm.weight's task vectors overflow float16, after the other tensors
    for name in ("base", "a", "b", "c"):
        (bad / name).mkdir(parents=True)
        tensors = load_file(str(models / name / "model.safetensors"))
        tensors["norm.weight"] = torch.full((16,), -60000.0 if name == "base" else 60000.0)
        save_file(tensors, str(bad / name / "model.safetensors"))
    work = tmp_path / "work"
    work.mkdir()
    for artifact in (None, work / "art"):
        params = [f"artifact_dir={artifact}"] if artifact else []
        result = _merge(host, bad, work / "out", *params)
        assert result.exit_code == 1 and "norm.weight: its task vectors reach" in result.stderr
        assert sorted(p.name for p in work.iterdir()) == ["runs"], list(work.iterdir())
        assert list(scratch.iterdir()) == []


def test_an_engine_failure_after_some_tensors_leaves_no_artifact(tmp_path):
    """The engine refuses b.weight after svd_hybrid merged it (fp16 output overflows) and reports
    the failure to the method (``finish``), which removes the unfinished artifact at once."""
    for name, value in (("base", 65000.0), ("a", 66000.0), ("b", 66000.0)):
        (tmp_path / name).mkdir()
        save_file({"a.weight": torch.ones(8, 16), "b.weight": torch.full((8, 16), value),
                   "c.weight": torch.ones(8, 16)}, str(tmp_path / name / "model.safetensors"))
    work = tmp_path / "work"
    work.mkdir()
    result = run_mk(["merge", "--method", "svd_hybrid", "--base", str(tmp_path / "base"), "--sources",
                     str(tmp_path / "a"), str(tmp_path / "b"), "--param", f"artifact_dir={work / 'art'}",
                     "--dtype", "fp16", "--out", str(work / "out"), "--output-dir", str(work / "runs")],
                    host=fresh_host({"svd_hybrid": plugin}))
    assert result.exit_code == 1 and "b.weight: the merged tensor is not finite" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["runs"], list(work.iterdir())


# --------------------------------------------------------------------------- column blocks


def _low_rank_tasks(d0: int, d1: int, tasks: int = 4, rank: int = 3) -> list[torch.Tensor]:
    """[d0, d1] task vectors whose basis side (the smaller) spans the same ``rank`` directions
    (a clear spectral gap), plus 1% noise."""
    g = torch.Generator().manual_seed(11)
    rows, cols = min(d0, d1), max(d0, d1)
    left = torch.randn(rows, rank, generator=g)
    out = [left @ torch.randn(rank, cols, generator=g) + 0.01 * torch.randn(rows, cols, generator=g)
           for _ in range(tasks)]
    return out if d0 <= d1 else [x.T.contiguous() for x in out]


def reference_gram(deltas: list[torch.Tensor], signal: torch.Tensor) -> torch.Tensor:
    """sum_t (M * X_t)(M * X_t)^T in float64, straight from the definition."""
    return sum((signal * d).double() @ (signal * d).double().T for d in deltas)


@pytest.mark.parametrize("shape", [(24, 200), (200, 24)])
def test_small_column_blocks_agree_with_one_block(shape):
    deltas = _low_rank_tasks(*shape)
    settings = CodecSettings(energy=0.99, fp16_energy=0.5)
    whole = encode(deltas, settings)
    blocked = encode(deltas, dataclasses.replace(settings, block_mb=0.001))  # 8 columns a block
    for part in whole.tensors:  # masks and the noise region are entrywise: the same bits
        if part.startswith(("mask", "task_masks", "noise")):
            assert torch.equal(whole.tensors[part], blocked.tensors[part]), part
    assert whole.meta["clusters"][0]["rank"] == blocked.meta["clusters"][0]["rank"] == 3
    decoder = Decoder(whole)
    signal = decoder.signal_mask()
    rows = signal.shape[0]
    matrices = [d.T if decoder.meta["transposed"] else d for d in deltas]
    evals, evecs = torch.linalg.eigh(reference_gram(matrices, signal))
    top = evecs[:, -3:].float()
    for record in (whole, blocked):
        basis = record.tensors["basis.0"].float()
        assert basis.shape == (rows, 3)
        assert torch.linalg.norm(top @ (top.T @ basis) - basis) < 2e-3  # the span of the reference
    w = [0.1, 0.4, 0.2, 0.3]
    a, b = Decoder(whole).combine(w), Decoder(blocked).combine(w)
    assert float(torch.linalg.norm(a - b) / torch.linalg.norm(a)) < 1e-4


def test_one_block_covers_a_tensor_within_the_budget():
    deltas = _low_rank_tasks(24, 200)
    first = encode(deltas, CodecSettings())
    again = encode(deltas, CodecSettings(block_mb=4096))
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert first.meta == again.meta


def test_an_artifact_dir_overlapping_the_output_is_refused_before_anything_is_written(tmp_path, models):
    host = fresh_host({"svd_hybrid": plugin})
    work = tmp_path / "work"
    work.mkdir()
    for out, artifact in ((work / "same", work / "same"), (work / "parent" / "model", work / "parent"),
                          (work / "outer", work / "outer" / "art")):
        result = _merge(host, models, out, f"artifact_dir={artifact}")
        assert result.exit_code == 2 and "artifact_dir" in result.stderr and "overlap" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in work.iterdir()) in ([], ["runs"]), list(work.iterdir())
