"""Readers and writers of full checkpoints: round trips, shards, atomicity, memory, bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_core.errors import FormatError
from mergekit_core.io.dtypes import safetensors_code
from mergekit_core.io.formats import open_checkpoint
from mergekit_core.io.readers import SafetensorsReader, TorchReader
from mergekit_core.io.safetensors_header import TensorInfo
from mergekit_core.io.writer import AtomicDirectory, StreamingSafetensorsWriter, sha256_file
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).half(),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.norm.weight": torch.ones(8, dtype=torch.float64),
        "position_ids": torch.arange(5),
        "empty": torch.zeros(0, 3),
    }


def _write(directory, tensors, max_shard_bytes):
    infos = [TensorInfo(n, tuple(t.shape), safetensors_code(t.dtype)) for n, t in tensors.items()]
    writer = StreamingSafetensorsWriter(directory, infos, max_shard_bytes=max_shard_bytes,
                                        metadata={"recipe": "test"})
    for name, t in tensors.items():
        writer.write(name, t)
    return writer.close()


@pytest.mark.parametrize("max_shard_bytes", [10**9, 300])
def test_streaming_writer_round_trip(tmp_path, max_shard_bytes):
    tensors = _tensors()
    hashes = _write(tmp_path, tensors, max_shard_bytes)
    for name, digest in hashes.items():
        assert sha256_file(tmp_path / name) == digest
    sharded = max_shard_bytes < 1000
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert (tmp_path / "model.safetensors").is_file() != sharded
    reader = open_checkpoint(tmp_path, HOST)
    assert reader.format_name == "hf_safetensors"
    assert list(reader.infos()) == sorted(reader.infos()) or set(reader.infos()) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t), name
    for shard in tmp_path.glob("*.safetensors"):  # valid files for the safetensors library itself
        loaded = load_file(shard)
        assert all(torch.equal(v, tensors[k]) for k, v in loaded.items())
        with safe_open(str(shard), "pt") as f:
            assert f.metadata()["recipe"] == "test"
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("max_shard_bytes", [10**9, 3 << 20])
def test_large_tensors_are_hashed_beside_the_write_in_file_order(tmp_path, max_shard_bytes):
    from mergekit_core.io.writer import PARALLEL_HASH_BYTES

    g = torch.Generator().manual_seed(1)
    sizes = [PARALLEL_HASH_BYTES // 4 + 3, PARALLEL_HASH_BYTES, 7, 2 * PARALLEL_HASH_BYTES // 4 + 1, 5]
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}  # float32: 4 bytes each
    hashes = _write(tmp_path, tensors, max_shard_bytes)
    assert len(hashes) == (1 if max_shard_bytes > 10**8 else 4)  # shards (and the index) when sharded
    for name, digest in hashes.items():
        assert sha256_file(tmp_path / name) == digest, name
    reader = open_checkpoint(tmp_path, HOST)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path, [TensorInfo("a", (2,), "F32"), TensorInfo("b", (2,), "F32")])
    with pytest.raises(Exception, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(Exception, match="planned \\[2\\] F32"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(Exception, match="closed before tensor 'b'"):
        writer.close()
    writer.abort()


def test_transformers_loads_written_model(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the test extra")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    reader = open_checkpoint(src, HOST)
    out = tmp_path / "out"
    with AtomicDirectory(out) as tmp:
        infos = list(reader.infos().values())
        writer = StreamingSafetensorsWriter(tmp, infos, max_shard_bytes=20_000)
        for info in infos:
            writer.write(info.name, reader.get(info.name))
        writer.close()
        (tmp / "config.json").write_text((src / "config.json").read_text())
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(10).reshape(1, 10)
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDirectory(dest) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    dest.mkdir()
    (dest / "old.txt").write_text("keep")
    with pytest.raises(RuntimeError):
        with AtomicDirectory(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    with AtomicDirectory(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == [".mergekit-output.json", "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from mergekit_core.io.writer import StreamingSafetensorsWriter
    from mergekit_core.io.safetensors_header import TensorInfo
    out, shard = sys.argv[1], int(sys.argv[2])
    n, rows = 48, 1024 * 1024  # 48 tensors of 4 MiB: 192 MiB in all
    infos = [TensorInfo(f"t{i}", (rows,), "F32") for i in range(n)]
    w = StreamingSafetensorsWriter(out, infos, max_shard_bytes=shard)
    torch.zeros(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(n):
        w.write(f"t{i}", torch.full((rows,), float(i)))
    w.close()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_streaming_writer_memory_does_not_grow_with_shard_size(tmp_path):
    growth = {}
    for shard in (16 * 2**20, 1024 * 2**20):
        out = tmp_path / str(shard)
        out.mkdir()
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(out), str(shard)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        growth[shard] = int(proc.stdout.strip()) / 1024  # MiB
    # One 4 MiB tensor at a time: the 1 GiB shard (192 MiB of data) costs what a 16 MiB one does.
    assert growth[1024 * 2**20] < 32, growth
    assert abs(growth[1024 * 2**20] - growth[16 * 2**20]) < 16, growth


# --------------------------------------------------------------------------- torch files


def test_torch_state_dict_round_trip(tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = open_checkpoint(tmp_path, HOST)
    assert isinstance(reader, TorchReader)
    assert set(reader.names()) == set(tensors)
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())
    single = open_checkpoint(tmp_path / "pytorch_model.bin", HOST)
    assert torch.equal(single.get("position_ids"), tensors["position_ids"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    with pytest.raises(FormatError, match="refused to load: it is not a plain state dict"):
        open_checkpoint(path, HOST).names()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(FormatError, match=str(raw.name)):
        open_checkpoint(raw, HOST).names()
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(FormatError, match="not a state dict"):
        open_checkpoint(not_dict, HOST).names()


# --------------------------------------------------------------------------- bad input


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        open_checkpoint(tmp_path / "nope", HOST)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(FormatError, match="directory is in no known format"):
        open_checkpoint(tmp_path / "junk", HOST)


def test_truncated_and_lying_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"cut.safetensors: tensor '.*' claims bytes .*the file is truncated"):
        open_checkpoint(tmp_path / "cut.safetensors", HOST)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="shorter than 8 bytes"):
        open_checkpoint(tmp_path / "tiny.safetensors", HOST)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [64, 65]  # a header that lies about sizes
    raw = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(FormatError, match=r"lie.safetensors: tensor 'a' claims bytes \d+\.\.\d+ \(16384 bytes\), "
                                          r"but shape \[64, 65\] F32 needs 16640 bytes; the header is wrong"):
        open_checkpoint(tmp_path / "lie.safetensors", HOST)
    (tmp_path / "garbage.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(FormatError, match="not valid JSON"):
        open_checkpoint(tmp_path / "garbage.safetensors", HOST)
    huge = (10**12).to_bytes(8, "little") + b"{}"
    (tmp_path / "huge.safetensors").write_bytes(huge)
    with pytest.raises(FormatError, match="corrupt or truncated"):
        open_checkpoint(tmp_path / "huge.safetensors", HOST)


def test_index_naming_a_missing_shard(tmp_path):
    _write(tmp_path, _tensors(), 300)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FormatError, match=f"names shard '{shards[-1].name}', which is missing"):
        open_checkpoint(tmp_path, HOST)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 4)
    result = run_mk(["inspect", str(tmp_path / "cut.safetensors")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


def test_inspect_model_and_json(tmp_path):
    _write(tmp_path, _tensors(), 10**9)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    result = run_mk(["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "hf_safetensors" in result.stdout and "7 tensors" in result.stdout
    info = json.loads(run_mk(["inspect", str(tmp_path), "--json"]).stdout)
    assert info["tensors"] == 7 and info["dtypes"]["F32"] == 3 and info["model_config"]["model_type"] == "llama"
    assert info["parameters"] == sum(t.numel() for t in _tensors().values())


def test_safetensors_file_reader_lists_without_loading(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    reader = SafetensorsReader.from_file(path)
    assert reader.infos()["model.layers.0.mlp.up_proj.weight"].dtype == "F16"
    assert reader._handles == {}  # nothing opened for data yet
    assert reader.get("empty").shape == (0, 3)


def test_mapped_tensors_equal_the_file_and_never_change_it(tmp_path):
    """Large tensors are memory-mapped privately (small ones read with pread): both equal what
    safetensors loads, and writing into a returned tensor leaves the file as it was."""
    from mergekit_core.io.readers import MAP_MIN_BYTES

    path = tmp_path / "w.safetensors"
    big = torch.randn(MAP_MIN_BYTES // 4 + 3, dtype=torch.float32)  # past the threshold, odd size
    tensors = {"small": torch.randn(7, 5).to(torch.bfloat16), "big": big, "after": torch.arange(10.0)}
    save_file(tensors, str(path))
    before = path.read_bytes()
    reader = SafetensorsReader.from_file(path)
    for name, expected in tensors.items():
        got = reader.get(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    mapped = reader.get("big")
    mapped.mul_(0).add_(1)  # the caller owns it: copy on write
    assert path.read_bytes() == before
    assert torch.equal(reader.get("big"), big)
    reader.close()
    assert float(mapped.sum()) == mapped.numel()  # the mapping outlives the reader's file handles


def test_a_file_cut_after_opening_is_one_line(tmp_path):
    from mergekit_core.io.readers import MAP_MIN_BYTES

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(8), "big": torch.zeros(MAP_MIN_BYTES // 2)}, str(path))
    reader = SafetensorsReader.from_file(path)
    with path.open("r+b") as f:  # another process truncates the file under the merge
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(FormatError, match=r"w.safetensors: cannot read tensor 'big' \(unexpected end of file"):
        reader.get("big")


def test_background_writes_keep_order_and_report_the_sink_error(tmp_path):
    from mergekit_core.engine.stream import _BackgroundSink

    seen = []

    def sink(name, tensor):
        if name == "bad":
            raise OSError("disk full")
        seen.append((name, float(tensor.sum())))

    writer = _BackgroundSink(sink)
    for i in range(5):
        writer(f"t{i}", torch.full((3,), float(i)))
    writer.drain()
    assert seen == [(f"t{i}", 3.0 * i) for i in range(5)]
    writer("bad", torch.zeros(1))
    with pytest.raises(OSError, match="disk full"):
        writer("next", torch.zeros(1))
    writer.close()
    assert [n for n, _ in seen] == [f"t{i}" for i in range(5)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is a Linux call")
def test_start_writeback_asks_the_kernel_and_never_raises(tmp_path):
    from mergekit_core.io.writeback import start_writeback

    path = tmp_path / "f.bin"
    with path.open("wb") as f:
        f.write(b"x" * 10_000)
        f.flush()
        assert start_writeback(f.fileno(), 0, 10_000)
        assert not start_writeback(f.fileno(), 0, 0)
    read_end, write_end = os.pipe()
    try:
        assert not start_writeback(write_end, 0, 10)  # a pipe has no pages to write back
    finally:
        os.close(read_end)
        os.close(write_end)
    assert path.read_bytes() == b"x" * 10_000
