"""Property-based tests of what reads untrusted input: safetensors headers, model directories and
merge configs.

Whatever the bytes or the YAML, the outcome is a result or one MergekitError whose one-line
message names the file (or the config); never another exception type. A result must hold up:
every tensor a header lists can be read with its shape, and a config that loads gives a spec.
Runs are derandomized (no example database), so CI sees the same examples every time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("hypothesis", reason="property tests need the test extra (pip install -e '.[test]')")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save  # noqa: E402

from mergekit_core.config import (  # noqa: E402
    LEGACY_KEYS,
    MERGE_KEYS,
    OUTPUT_KEYS,
    SOURCE_ALIASES,
    SWEEP_KEYS,
    MergeConfig,
    MergeSpec,
    load_merge_config,
)
from mergekit_core.errors import MergekitError  # noqa: E402
from mergekit_core.io.formats import open_checkpoint  # noqa: E402
from mergekit_core.io.readers import SAFETENSORS_INDEX, SafetensorsReader  # noqa: E402
from mergekit_core.io.safetensors_header import DTYPE_SIZES, read_header  # noqa: E402
from mergekit_core.testing import fresh_host, run_mk  # noqa: E402

HOST = fresh_host()
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID = save({
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.arange(5),
    "empty": torch.zeros(0, 32),
    "scalar": torch.tensor(1.5, dtype=torch.float16),
    "c": torch.ones(2, 2, dtype=torch.bfloat16),
})
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]


def outcome(fn: Callable[[], Any], *names: str) -> Any:
    """``fn()``, or the MergekitError it raised, checked to be one line that names one of ``names``."""
    try:
        return fn()
    except MergekitError as exc:
        assert exc.message and "\n" not in exc.message, repr(exc.message)
        assert any(n in exc.message for n in names), f"{exc.message!r} names none of {names}"
        return exc


# --------------------------------------------------------------------------- safetensors files


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _read_everything(path: Path) -> None:
    header = read_header(path)
    data_len = path.stat().st_size - header.data_start
    spans = sorted((header.offsets[n], header.offsets[n] + i.nbytes) for n, i in header.tensors.items() if i.nbytes)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end, "overlapping tensors were accepted"
    with SafetensorsReader.from_file(path) as reader:
        for name, info in reader.infos().items():
            assert all(isinstance(d, int) and d >= 0 for d in info.shape)
            assert header.offsets[name] + info.nbytes <= data_len
            x = reader.get(name)
            assert tuple(x.shape) == info.shape


def check_file(work: Path, content: bytes) -> Any:
    path = work / "model.safetensors"
    path.write_bytes(content)
    return outcome(lambda: _read_everything(path), str(path))


def _file(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
dtypes = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), json_values)
shapes = st.one_of(st.lists(st.integers(-2, 6), max_size=4), st.lists(st.integers(0, 2**64), max_size=3), json_values)
offsets = st.one_of(st.lists(st.integers(-2, 300), max_size=3), json_values)


@st.composite
def sized_entries(draw: st.DrawFn) -> dict[str, Any]:
    """Entries whose offsets span exactly their size, at random places: overlaps, gaps, overruns."""
    dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    begin = draw(st.integers(0, 96))
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n]}


entries = st.one_of(
    sized_entries(),
    st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets}),
    json_values,
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=8), entries, max_size=4),
    st.dictionaries(st.text(max_size=8), entries, max_size=3).map(lambda h: {**h, "__metadata__": {"format": "pt"}}),
    st.builds(lambda h, m: {**h, "__metadata__": m}, st.dictionaries(st.text(max_size=8), sized_entries(), max_size=2),
              json_values),
    json_values,
)


@PROPERTY
@given(n=st.integers(0, len(VALID)))
def test_truncated_files(work, n):
    result = check_file(work, VALID[:n])
    assert (result is None) == (n == len(VALID))


@PROPERTY
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(work, flips):
    content = bytearray(VALID)
    for i, x in flips:
        content[i] ^= x
    check_file(work, bytes(content))


@PROPERTY
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, HEADER_LEN + 64)))
@example(length=2**64 - 1)
@example(length=0)
def test_bogus_header_lengths(work, length):
    check_file(work, struct.pack("<Q", length) + VALID[8:])


@PROPERTY
@given(header=headers, data=st.binary(max_size=128))
@example(header={"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=bytes(12))
@example(header={"t": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}, data=bytes(4))
@example(header={"t": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}, data=bytes(4))
@example(header={"t": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}, data=bytes(4))
@example(header={"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, data=bytes(4))
@example(header={"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, data=bytes(4))
@example(header={"t": {"dtype": "F32", "shape": [10**300, 10**300], "data_offsets": [0, 4]}}, data=bytes(4))
@example(header={"__metadata__": ["x"]}, data=b"")
@example(header={"__metadata__": {"k": 1}}, data=b"")
@example(header=[1, 2], data=b"")
def test_random_json_headers(work, header, data):
    result = check_file(work, _file(header, data))
    if result is None:
        assert isinstance(header, dict)


@PROPERTY
@given(raw=st.binary(max_size=64), data=st.binary(max_size=16))
@example(raw=b"[" * 100_000, data=b"")
@example(raw=b'{"t": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}', data=bytes(4))
@example(raw=b"\xff\xfe\x00{", data=b"")
def test_random_header_bytes(work, raw, data):
    check_file(work, _file(None, data, raw=raw))


shard_names = st.one_of(st.sampled_from(["model.safetensors", "missing.safetensors", ""]), json_values)
weight_maps = st.one_of(json_values, st.dictionaries(st.sampled_from(["a", "b", "x"]), shard_names, max_size=3))
indexes = st.one_of(json_values, st.fixed_dictionaries({"weight_map": weight_maps}), st.none())


@PROPERTY
@given(index=indexes, config=st.one_of(json_values, st.none(), st.binary(max_size=8)))
@example(index={"weight_map": {"a": 1}}, config=None)
@example(index={"weight_map": {"a": ["model.safetensors"]}}, config=None)
@example(index=None, config=[1, 2])
@example(index=None, config=b"[" * 100_000)
def test_model_directories_with_random_index_and_config(work, index, config):
    directory = work / "model"
    directory.mkdir(exist_ok=True)
    (directory / "model.safetensors").write_bytes(VALID)
    for name, value in ((SAFETENSORS_INDEX, index), ("config.json", config)):
        path = directory / name
        path.unlink(missing_ok=True)
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif value is not None:
            path.write_text(json.dumps(value))

    def read() -> None:
        with open_checkpoint(directory, HOST) as reader:
            assert reader.model_config is None or isinstance(reader.model_config, dict)
            for name, info in reader.infos().items():
                assert tuple(reader.get(name).shape) == info.shape

    outcome(read, str(directory))


# --------------------------------------------------------------------------- configs


ALL_KEYS = sorted(MERGE_KEYS | SWEEP_KEYS | set(SOURCE_ALIASES) | set(LEGACY_KEYS))
yaml_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=8,
)
paths = st.one_of(st.sampled_from(["m1", "m2", "base", ".", "", "~", "~nosuchuser-mk/x", "/nonexistent", "a\x00b"]),
                  st.text(max_size=10))
components = st.one_of(
    st.sampled_from(["task_arithmetic", "ties", "uniform", "nope"]),
    st.fixed_dictionaries({}, optional={"name": st.one_of(st.sampled_from(["ties", "uniform"]), yaml_values),
                                        "type": yaml_values, "params": yaml_values, 3: yaml_values, "x": yaml_values}),
    yaml_values,
)
sizes = st.one_of(st.sampled_from(["5GB", "1.2.3", ".", "9" * 400, "0", "-1", "2GiB", " 10 kb "]), yaml_values)
structured = {
    "sources": st.one_of(st.lists(st.one_of(paths, st.fixed_dictionaries(
        {}, optional={"name": yaml_values, "path": st.one_of(paths, yaml_values)}), yaml_values), max_size=3),
        yaml_values),
    "base_model": st.one_of(paths, yaml_values),
    "method": components,
    "lambda_policy": components,
    "optimizer": components,
    "transforms": st.one_of(st.lists(components, max_size=2), yaml_values),
    "method_params": st.one_of(st.dictionaries(st.text(max_size=6) | st.integers(), yaml_values, max_size=3), yaml_values),
    "output": st.one_of(paths, yaml_values, st.dictionaries(
        st.one_of(st.sampled_from(sorted(OUTPUT_KEYS)), st.text(max_size=5), st.integers()),
        st.one_of(sizes, st.sampled_from(["fp16", "bf16", "model", "auto"]), yaml_values), max_size=4)),
    "output_dir": st.one_of(paths, yaml_values),
    "sources_root": st.one_of(paths, yaml_values),
    "evaluator_params": st.dictionaries(st.text(max_size=5), st.one_of(paths, yaml_values), max_size=3),
}
config_dicts = st.dictionaries(
    st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=8), st.integers(), st.none(), st.booleans()),
    yaml_values, max_size=6,
).flatmap(lambda extra: st.fixed_dictionaries(
    {}, optional={k: v for k, v in structured.items()}).map(lambda known: {**extra, **known}))
overrides = st.dictionaries(
    st.sampled_from(["method", "output.path", "output.dtype", "output.kind", "seed", "merge_mode", "sources"]),
    st.one_of(st.none(), paths, yaml_values), max_size=3)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A folder with existing model paths (m1, m2, base), so that some random configs load."""
    root = tmp_path_factory.mktemp("configs")
    for name in ("m1", "m2", "base"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(VALID)
    return root


def check_config(data: Any, path: Path, extra: dict[str, Any] | None = None) -> Any:
    where = str(path)
    cfg = outcome(lambda: MergeConfig.from_dict(data, path), where)
    if isinstance(cfg, MergekitError):
        return cfg
    if extra:
        cfg = outcome(lambda: cfg.with_overrides(extra), where)
        if isinstance(cfg, MergekitError):
            return cfg
    spec = outcome(cfg.to_spec, where)
    if isinstance(spec, MergeSpec):
        json.dumps(spec.to_json(), default=str)
        json.dumps(spec.to_config())
        assert spec.sources, "a spec without sources"
    return spec


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@PROPERTY
@given(data=config_dicts, extra=overrides)
@example(data={"output": "out"}, extra={"output.dtype": "fp16"})
@example(data={"output": 5}, extra={"output.dtype": "fp16"})
@example(data={"method": {"name": "ties", 1: 2, "b": 3}}, extra={})
@example(data={1: "x", None: "y"}, extra={})
@example(data={"grid": [1], "search": "random"}, extra={})
@example(data={"lambda": 0.3, "method_params": [1]}, extra={})
@example(data={"params": [1]}, extra={})
@example(data={"sources": ["m1", "m2"], "method": "ties", "output": {"shard_size": "1.2.3"}}, extra={})
@example(data={"sources": ["m1"], "method": "ties", "output": {"shard_size": "9" * 400}}, extra={})
@example(data={"sources": ["~nosuchuser-mk/m1"], "method": "ties", "output_dir": "~nosuchuser-mk"}, extra={})
@example(data={"sources": ["m1"], "method": "ties", "method_params": {1: 2}}, extra={})
@example(data={"sources": ["m1", "m2"], "base_model": "base", "method": "ties"}, extra={})
@example(data={"sources": ["m" * 300], "base_model": "b" * 300, "evaluator_params": {"x": "e" * 300}}, extra={})
@example(data={"\n": None, "output": {"\n": 1}, "sources": ["a\nb"]}, extra={})
def test_random_config_dicts(config_dir, data, extra):
    check_config(data, config_dir / "config.yaml", extra)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@PROPERTY
@given(data=st.one_of(yaml_values, config_dicts))
def test_from_dict_on_anything(config_dir, data):
    check_config(data, config_dir / "config.yaml")


def _mutate(text: str, cut: int, insert: str) -> str:
    at = min(cut, len(text))
    return text[:at] + insert + text[at:]


yaml_texts = st.one_of(
    st.text(max_size=60),
    st.builds(_mutate, config_dicts.map(lambda d: yaml.safe_dump(d, default_flow_style=None, allow_unicode=True)),
        st.integers(0, 200), st.text(max_size=6)),
    st.sampled_from([": : :", "- a\n- b", "sources: [", "a: 2001-13-45", "seed: " + "1" * 5000, "[" * 5000,
                     "a: !!python/object/apply:os.system ['true']", "x: &a [*a]\nsources: *a", "method:\t- x",
                     "sources: !!binary 'not base64'", "a: !!float abc", "a: !!int 0x", "--- 1\n--- 2"]),
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@PROPERTY
@given(text=yaml_texts)
def test_random_yaml_texts(config_dir, text):
    path = config_dir / "config.yaml"
    path.write_text(text)
    cfg = outcome(lambda: load_merge_config(path), str(path))
    if isinstance(cfg, MergeConfig):
        outcome(cfg.to_spec, str(path))


@PROPERTY
@given(raw=st.binary(max_size=32))
@example(raw=b"method: \xff\xfe")
def test_config_bytes(config_dir, raw):
    path = config_dir / "config.yaml"
    path.write_bytes(raw)
    cfg = outcome(lambda: load_merge_config(path), str(path))
    if isinstance(cfg, MergeConfig):
        outcome(cfg.to_spec, str(path))


# --------------------------------------------------------------------------- through the CLI


def _one_error_line(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and all(line.startswith(("Error:", "hint:")) for line in lines), result.stderr
    return errors[0]


CORRUPT_FILES = {
    "truncated": VALID[: len(VALID) // 2],
    "garbage": b"\x00" * 3,
    "huge_length": struct.pack("<Q", 2**63) + VALID[8:],
    "not_json": _file(None, raw=b"{not json"),
    "deep": _file(None, raw=b"[" * 100_000),
    "overlap": _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    "bad_shape": _file({"t": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}, bytes(4)),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_inspect_a_corrupt_file(case, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(CORRUPT_FILES[case])
    assert str(path) in _one_error_line(run_mk(["inspect", str(path)]))


CORRUPT_CONFIGS = {
    "yaml": b"sources: [a, b\nmethod: ties\n",
    "utf8": b"method: \xff\xfe\n",
    "date": b"sources: [m1]\nmethod: ties\nseed: 2001-13-45\n",
    "deep": b"[" * 5000,
    "types": b"sources: 5\nmethod: [1, 2]\noutput: {shard_size: 1.2.3, 3: x}\nseed: x\n",
    "overrides": b"sources: [m1, m2]\nmethod: ties\noutput: 5\n",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CONFIGS))
def test_dry_run_of_a_corrupt_config(case, tmp_path):
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(VALID)
    config = tmp_path / "config.yaml"
    config.write_bytes(CORRUPT_CONFIGS[case])
    args = ["merge", str(config), "--dry-run"] + (["--dtype", "fp16"] if case == "overrides" else [])
    assert str(config) in _one_error_line(run_mk(args))


def test_dry_run_with_a_corrupt_source(tmp_path):
    for name in ("base", "m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(VALID)
    broken = tmp_path / "m2" / "model.safetensors"
    broken.write_bytes(CORRUPT_FILES["bad_shape"])
    config = tmp_path / "config.yaml"
    config.write_text("base_model: base\nsources: [m1, m2]\nmethod: task_arithmetic\n")
    assert str(broken) in _one_error_line(run_mk(["merge", str(config), "--dry-run"]))
