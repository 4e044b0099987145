"""The YAML schema shared by merges and sweeps, and its normalisation into a :class:`MergeSpec`.

``load_merge_config(path)`` reads YAML with ``yaml.safe_load`` (a config can never run code),
checks every key, and returns a :class:`MergeConfig`; ``.to_spec()`` normalises it. Every
problem found is reported at once, in one :class:`ConfigError`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core.components import closest
from mergekit_core.errors import ConfigError, MkDeprecationWarning, UsageError
from mergekit_core.io import hub

MERGE_KEYS = {
    "sources", "base_model", "method", "method_params", "merge_mode", "transforms", "lambda_policy",
    "optimizer", "output", "include", "exclude", "seed", "compute_dtype", "sources_root", "name",
    "untie_word_embeddings", "device",
}
SOURCE_ALIASES = ("adapters", "models")
SWEEP_KEYS = {"search", "eval_tasks", "split", "eval_subset", "save_merged", "constraint_nonnegative",
              "output_dir", "evaluator", "evaluator_params", "executor"}
LEGACY_KEYS = {"grid": "search.grid (with search.type: grid)", "lambda": "method_params.lambda",
               "params": "method_params"}
OUTPUT_KEYS = {"path", "kind", "dtype", "shard_size", "adapter_rank", "save"}
MERGE_MODES = ("common", "strict", "union")
OUTPUT_KINDS = ("auto", "model", "adapter")


def is_device_name(value: Any) -> bool:
    """Whether ``value`` names a merge device: auto, cpu, cuda or cuda:N."""
    return isinstance(value, str) and (value in ("auto", "cpu", "cuda") or (
        value.startswith("cuda:") and value[5:].isdigit()))
DEFAULT_SHARD = "5GB"
DEFAULT_OUTPUT_DIR = "artifacts"


@dataclass
class ComponentRef:
    """A component named in a config, with its (not yet validated) parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceSpec:
    name: str
    path: Path


@dataclass
class OutputSpec:
    path: Path | None = None
    kind: str = "auto"
    dtype: str | None = None
    shard_bytes: int = 5 * 1000**3
    adapter_rank: int | None = None
    save: bool = True


@dataclass
class MergeSpec:
    """A normalised merge: what ``engine.run_merge`` takes."""

    sources: list[SourceSpec]
    method: ComponentRef
    base_model: Path | None = None
    merge_mode: str = "common"
    transforms: list[ComponentRef] = field(default_factory=list)
    lambda_policy: ComponentRef | None = None
    optimizer: ComponentRef = field(default_factory=lambda: ComponentRef("none"))
    output: OutputSpec = field(default_factory=OutputSpec)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    compute_dtype: str = "float32"
    device: str = "auto"
    """Where the merge arithmetic runs: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N."""
    output_dir: Path = Path(DEFAULT_OUTPUT_DIR)
    untie_word_embeddings: bool = False
    sweep: dict[str, Any] = field(default_factory=dict)
    config_file: Path | None = None
    """The YAML file the spec was read from (an input: no output may replace it)."""

    @property
    def task_combo(self) -> str:
        return "_".join(safe_name(s.name) for s in self.sources)

    def to_config(self) -> dict[str, Any]:
        """A config dict that loads back into this spec (what run bundles keep)."""
        def ref(r: ComponentRef | None) -> dict[str, Any] | None:
            return None if r is None else {"name": r.name, "params": dict(r.params)}

        out: dict[str, Any] = {
            "sources": [{"name": s.name, "path": str(s.path)} for s in self.sources],
            "method": ref(self.method), "merge_mode": self.merge_mode,
            "transforms": [ref(t) for t in self.transforms], "optimizer": ref(self.optimizer),
            "output": {"path": str(self.output.path) if self.output.path else None, "kind": self.output.kind,
                       "dtype": self.output.dtype, "shard_size": self.output.shard_bytes,
                       "adapter_rank": self.output.adapter_rank, "save": self.output.save},
            "include": list(self.include), "exclude": list(self.exclude), "seed": self.seed,
            "compute_dtype": self.compute_dtype, "output_dir": str(self.output_dir), **self.sweep,
        }
        if self.untie_word_embeddings:
            out["untie_word_embeddings"] = True
        if self.device != "auto":
            out["device"] = self.device
        if self.base_model is not None:
            out["base_model"] = str(self.base_model)
        if self.lambda_policy is not None:
            out["lambda_policy"] = ref(self.lambda_policy)
        if out["output"]["path"] is None:
            del out["output"]["path"]
        return json.loads(json.dumps(out, default=str))

    def to_json(self) -> dict[str, Any]:
        def conv(x: Any) -> Any:
            if isinstance(x, Path):
                return str(x)
            if isinstance(x, dict):
                return {str(k): conv(v) for k, v in x.items()}
            if isinstance(x, list):
                return [conv(v) for v in x]
            return x

        return conv(asdict(self))


def _shown(value: Any) -> str:
    """``value`` for a one-line message: as written when printable, else with escapes (``\\n``)."""
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def _file_path(value: Any, base_dir: Path) -> Any:
    """A component parameter that names an existing file or folder relative to the config file
    (it has a folder part or a file suffix: ``../run/lambdas.json``, ``table.json``), made
    absolute; anything else as it is (``layer`` stays a word even next to a folder of that name)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    if "/" not in value and not Path(value).suffix:
        return value
    return str((base_dir / value).resolve()) if _exists(base_dir / value) else value


def _exists(path: Path) -> bool:
    """``path.exists()``, False for names the file system refuses (too long, NUL bytes)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def parse_size(value: Any, what: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what}: cannot read size {value!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    try:
        size = int(float(m.group(1)) * powers[unit])
    except (ValueError, OverflowError):  # "1.2.3", or more digits than a float holds
        raise ConfigError(f"{what}: cannot read size {value!r}; write e.g. 5GB, 500MB or a number of bytes") from None
    if size <= 0:
        raise ConfigError(f"{what}: size must be positive, got {value!r}")
    return size


def component_ref(value: Any, what: str, problems: list[str]) -> ComponentRef | None:
    """``name`` or ``{name: ..., params: {...}}``."""
    if value is None:
        return None
    if isinstance(value, str):
        return ComponentRef(value)
    if isinstance(value, Mapping):
        extra = set(value) - {"name", "params", "type"}
        if extra:
            problems.append(f"{what}: unknown key '{_shown(sorted(map(str, extra))[0])}' (use name and params)")
        name = value.get("name", value.get("type"))
        params = value.get("params") or {}
        if not isinstance(name, str):
            problems.append(f"{what}: needs a 'name'")
            return None
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            problems.append(f"{what}: 'params' must be a mapping of parameter names to values")
            params = {}
        return ComponentRef(name, dict(params))
    problems.append(f"{what}: must be a name or {{name, params}}, got {value!r}")
    return None


@dataclass
class MergeConfig:
    """The raw, key-checked config; :meth:`to_spec` normalises and validates values."""

    data: dict[str, Any]
    path: Path | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> MergeConfig:
        where = str(path) if path else "config"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
        data = dict(data)
        for alias in SOURCE_ALIASES:
            if alias in data:
                if "sources" in data:
                    raise ConfigError(f"{where}: give the sources once, as 'sources' (or '{alias}')")
                data["sources"] = data.pop(alias)
        for old, new in LEGACY_KEYS.items():
            if old in data:
                warnings.warn(f"{where}: '{old}' is deprecated; use {new}", MkDeprecationWarning, stacklevel=3)
                value = data.pop(old)
                target = "search" if old == "grid" else "method_params"
                for key, v in ((target, data.get(target)), (old, value if old == "params" else None)):
                    if not isinstance(v or {}, Mapping):
                        raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(v).__name__}")
                if old == "grid":
                    search = dict(data.get("search") or {})
                    search.setdefault("type", "grid")
                    search.setdefault("grid", value)
                    data["search"] = search
                elif old == "lambda":
                    data["method_params"] = {**(data.get("method_params") or {}), "lambda": value}
                else:
                    data["method_params"] = {**(value or {}), **(data.get("method_params") or {})}
        known = MERGE_KEYS | SWEEP_KEYS | set(SOURCE_ALIASES)
        problems = []
        for key in data:
            if key not in known:
                guess = closest(str(key), known)
                problems.append(f"unknown key '{_shown(key)}'" + (f" (did you mean '{guess}'?)" if guess else ""))
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return cls(data, path)

    def method_params_with(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The config's ``method_params`` with ``params`` (from the command line) winning.

        Raises:
            ConfigError: the config's ``method_params`` is not a mapping.
        """
        existing = self.data.get("method_params") or {}
        if not isinstance(existing, Mapping):
            where = str(self.path) if self.path else "config"
            raise ConfigError(f"{where}: method_params must be a mapping of parameter names to values, "
                              f"got {type(existing).__name__}")
        return {**existing, **params}

    def with_overrides(self, overrides: Mapping[str, Any]) -> MergeConfig:
        """Flags win over the file: ``{"method": "ties", "output.path": "out"}``."""
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.data.items()}
        for key, value in overrides.items():
            if value is None:
                continue
            if "." in key:
                head, tail = key.split(".", 1)
                current = data.get(head) or {}
                if head == "output" and isinstance(current, str):
                    current = {"path": current}
                if not isinstance(current, Mapping):
                    where = str(self.path) if self.path else "config"
                    raise ConfigError(f"{where}: '{head}' must be a mapping to set {key}, got {type(current).__name__}")
                data[head] = {**current, tail: value}
            else:
                data[key] = value
        return MergeConfig.from_dict(data, self.path)

    def to_spec(self) -> MergeSpec:
        d, problems = self.data, []
        where = str(self.path) if self.path else "config"
        base_dir = self.path.parent.absolute() if self.path else Path.cwd()  # paths in the spec are absolute
        for key, value in (("base_model", d.get("base_model")), ("sources_root", d.get("sources_root")),
                           ("output_dir", d.get("output_dir")),
                           ("output.path", d["output"].get("path") if isinstance(d.get("output"), Mapping) else None)):
            if value is not None and not isinstance(value, (str, Path)):
                problems.append(f"{key}: must be a path (text), got {_shown(repr(value))}")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        root = d.get("sources_root")
        sources = self._sources(d.get("sources"), base_dir, root, problems)
        base = d.get("base_model")
        base_path = self._path(base, base_dir) if base else None
        if base and not _exists(base_path) and hub.is_repo_id(base):
            try:
                base_path = hub.resolve_hub_model(str(base))
            except UsageError as exc:
                problems.append(f"base_model: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        if base and not _exists(base_path) and not any(p.startswith("base_model:") for p in problems):
            problems.append(f"base_model: {_shown(base_path)} does not exist")
        method = component_ref(d.get("method"), "method", problems)
        if method is None and "method" not in d:
            problems.append("method: missing; name a merge method (see 'mk plugins list')")
        method_params = d.get("method_params") or {}
        if not isinstance(method_params, Mapping) or not all(isinstance(k, str) for k in method_params):
            problems.append("method_params: must be a mapping of parameter names to values")
            method_params = {}
        if method is not None:
            method.params = {**method.params, **dict(method_params)}
        mode = d.get("merge_mode", "common")
        if mode not in MERGE_MODES:
            problems.append(f"merge_mode: must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
        transforms_raw = d.get("transforms") or []
        if not isinstance(transforms_raw, list):
            problems.append("transforms: must be a list of names or {name, params}")
            transforms_raw = []
        transforms = [t for i, v in enumerate(transforms_raw)
                      if (t := component_ref(v, f"transforms[{i}]", problems)) is not None]
        policy = component_ref(d.get("lambda_policy"), "lambda_policy", problems)
        optimizer = component_ref(d.get("optimizer", "none"), "optimizer", problems) or ComponentRef("none")
        for ref in (policy, optimizer):  # a lambda table, saved coefficients: relative to the config file
            if ref is not None:
                ref.params = {k: _file_path(v, base_dir) for k, v in ref.params.items()}
        output = self._output(d.get("output"), base_dir, problems)
        include, exclude = d.get("include") or [], d.get("exclude") or []
        for key, value in (("include", include), ("exclude", exclude)):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                problems.append(f"{key}: must be a list of tensor-name patterns (glob, e.g. '*.lm_head.*')")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            problems.append(f"seed: must be an integer, got {seed!r}")
        compute = d.get("compute_dtype", "float32")
        try:
            from mergekit_core.io.dtypes import parse_user_dtype

            compute = parse_user_dtype(compute, "compute_dtype")
        except ConfigError as exc:
            problems.append(str(exc))
        device = d.get("device", "auto")
        if not is_device_name(device):
            problems.append(f"device: must be auto, cpu, cuda or cuda:N (N a GPU index), got {device!r}")
        untie = d.get("untie_word_embeddings", False)
        if not isinstance(untie, bool):
            problems.append(f"untie_word_embeddings: must be true or false, got {untie!r}")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return MergeSpec(
            sources=sources, method=method, base_model=base_path, merge_mode=mode, transforms=transforms,
            lambda_policy=policy, optimizer=optimizer, output=output, include=include, exclude=exclude,
            seed=seed, compute_dtype=compute, device=device if isinstance(device, str) else "auto",
            output_dir=self._path(d.get("output_dir", DEFAULT_OUTPUT_DIR), base_dir),
            sweep=self._sweep(d, base_dir), untie_word_embeddings=untie,
            config_file=self.path.absolute() if self.path else None,
        )

    @staticmethod
    def _sweep(d: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
        """Sweep keys; evaluator parameters naming an existing path relative to the config file
        are made absolute, like every other path in a config."""
        sweep = {k: d[k] for k in SWEEP_KEYS if k in d}
        params = sweep.get("evaluator_params")
        if isinstance(params, Mapping):
            resolved = {}
            for key, value in params.items():
                if isinstance(value, str) and value and not Path(value).is_absolute() and _exists(base_dir / value):
                    value = str((base_dir / value).resolve())
                resolved[key] = value
            sweep["evaluator_params"] = resolved
        return sweep

    @staticmethod
    def _path(value: Any, base_dir: Path) -> Path:
        p = Path(str(value))
        try:
            p = p.expanduser()
        except RuntimeError:  # "~user" of an unknown user: left as written, so it is reported as missing
            pass
        return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))

    def _sources(self, raw: Any, base_dir: Path, root: Any, problems: list[str]) -> list[SourceSpec]:
        if not raw or not isinstance(raw, list):
            problems.append("sources: give a list of model or adapter paths (or task names with sources_root)")
            return []
        out: list[SourceSpec] = []
        for i, entry in enumerate(raw):
            if isinstance(entry, Mapping):
                name, value = entry.get("name"), entry.get("path")
            else:
                name, value = None, entry
            if not isinstance(value, (str, Path)):
                problems.append(f"sources[{i}]: must be a path, a task name, or {{name, path}}")
                continue
            path = self._path(value, base_dir)
            if not _exists(path) and root is not None:
                path = self._path(Path(str(root)) / str(value), base_dir)
            if not _exists(path) and hub.is_repo_id(value):
                try:
                    path = hub.resolve_hub_model(str(value))
                except UsageError as exc:
                    problems.append(f"sources[{i}]: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
                    continue
                name = name or str(value).split("/")[-1].split("@")[0]
            if not _exists(path):
                where = f" or under sources_root {_shown(root)}" if root is not None else ""
                problems.append(f"sources[{i}]: {_shown(value)} is not a path{where}; check the name")
                continue
            out.append(SourceSpec(str(name) if name else Path(str(value)).name, path))
        names = [s.name for s in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"sources: the name '{_shown(dup[0])}' is used twice; give each source a distinct name")
        return out

    def _output(self, raw: Any, base_dir: Path, problems: list[str]) -> OutputSpec:
        if raw is None:
            return OutputSpec()
        if isinstance(raw, str):
            raw = {"path": raw}
        if not isinstance(raw, Mapping):
            problems.append("output: must be a mapping (path, kind, dtype, shard_size, adapter_rank, save)")
            return OutputSpec()
        for key in raw:
            if key not in OUTPUT_KEYS:
                guess = closest(str(key), OUTPUT_KEYS)
                problems.append(f"output: unknown key '{_shown(key)}'" + (f" (did you mean '{guess}'?)" if guess else ""))
        out = OutputSpec()
        if raw.get("path"):
            out.path = self._path(raw["path"], base_dir)
        kind = raw.get("kind", "auto")
        if kind not in OUTPUT_KINDS:
            problems.append(f"output.kind: must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}")
        out.kind = kind
        if raw.get("dtype") is not None:
            from mergekit_core.io.dtypes import parse_user_dtype

            try:
                out.dtype = parse_user_dtype(raw["dtype"], "output.dtype")
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            out.shard_bytes = parse_size(raw.get("shard_size", DEFAULT_SHARD), "output.shard_size")
        except ConfigError as exc:
            problems.append(str(exc))
        rank = raw.get("adapter_rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            problems.append(f"output.adapter_rank: must be a positive integer, got {rank!r}")
        out.adapter_rank = rank
        out.save = bool(raw.get("save", True))
        return out


def parse_key_values(items: list[str], flag: str = "--param") -> dict[str, Any]:
    """``KEY=VALUE`` words from the command line; values are read as YAML (numbers, lists, maps)."""
    import yaml

    from mergekit_core.errors import UsageError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} k=20")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _unique_key_loader() -> type:
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML would keep the
    last silently, so ``method:`` given twice would merge with the method the user did not mean)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_shown(key)!r}", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_merge_config(path: Path | str) -> MergeConfig:
    """Read a YAML config safely; raise ConfigError naming the file on any problem."""
    path = Path(path)
    return MergeConfig.from_dict(read_config_yaml(path) or {}, path)


def read_config_yaml(path: Path) -> Any:
    """The YAML document of a config file, read safely (no tags that run code, no duplicate keys).

    Raises:
        ConfigError: naming the file: missing, unreadable, not UTF-8 text, or not valid YAML.
    """
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not valid UTF-8); a config is YAML text") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f" ({problem})" if isinstance(problem, str) and problem.startswith("duplicate key") else ""
        raise ConfigError(f"{path}: not valid YAML{where}{detail}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as exc:  # a value YAML cannot build: a date like 2024-13-01, a huge int
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return data
