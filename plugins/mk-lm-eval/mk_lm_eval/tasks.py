"""lm-eval tasks: resolve names and YAML files, load each once per process, point it at a split,
list its labels and name its primary metric (imports lm-eval).

A task is named by lm-eval's registry name (``arc_easy``), by a task defined in the folder given
as ``include_path``, or by the path of a task YAML file (its ``task:`` key is then its name).
Building lm-eval's registry index reads every YAML file lm-eval ships (about 13,000: seconds to
tens of seconds), so it is built only for a name that is neither a file nor in ``include_path``.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergekit_core import ConfigError

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""``dataset_path`` values that read local ``data_files`` (datasets' packaged builders)."""
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


@dataclass(frozen=True)
class TaskSpec:
    """Where a task comes from: ``spec`` (a name, or a YAML file's absolute path), its task
    ``name``, and ``local`` (a file or a task of ``include_path``: no registry index needed)."""

    spec: str
    name: str
    local: bool


@dataclass
class LoadedTask:
    """An lm-eval Task with its data, and the dataset split name behind each of our splits."""

    task: Any
    splits: dict[str, str | None]
    labels: dict[tuple[str, int | None], list[int]] = field(default_factory=dict)
    """Labels by (split, limit), computed once (the core asks before every subset evaluation)."""

    def select(self, split: str) -> Any:
        """The task, scoring ``split`` (lm-eval scores its ``test_split``, so that is pointed at it).

        Raises:
            ConfigError: the task has no such split.
        """
        name = self.splits[split]
        if name is None:
            has = [s for s, n in self.splits.items() if n is not None]
            raise ConfigError(f"lm_eval: task {self.task.task_name} has no {split} split (it has "
                              f"{', '.join(has) or 'none'}); choose one of those with --split")
        self.task.set_config(key="test_split", value=name)
        return self.task


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Unless ``verbose``: lm-eval's, datasets' and transformers' logs (below ERROR) and progress
    bars (written to stderr) are hidden while the block runs; errors still raise."""
    if verbose:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def task_specs(tasks: Any) -> list[str]:
    """The ``tasks`` parameter as a list: a list, or one string of comma-separated names."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    if not items or not all(isinstance(t, str) and t for t in items):
        raise ConfigError(f"lm_eval: parameter 'tasks' must list lm-eval task names or task YAML files, got {tasks!r}")
    return items


def is_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


@lru_cache(maxsize=4)
def _manager(include_path: str | None, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _loader() -> Any:
    """A safe YAML loader that keeps lm-eval's ``!function`` tags as strings (runs no code)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.load(path.read_text(), Loader=_loader())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"lm_eval: task file {path} is not readable YAML ({str(exc).splitlines()[0]})") from exc
    return raw if isinstance(raw, dict) else {}


def resolve(spec: str, include_path: str | None) -> TaskSpec:
    """Find a task: a YAML file, a task of ``include_path``, or one of lm-eval's registry.

    Raises:
        ConfigError: no such file or task (with the closest known name), or a group.
    """
    if is_file(spec):
        path = Path(spec).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"lm_eval: task file {path} does not exist")
        name = _read_yaml(path).get("task")
        if not isinstance(name, str):
            raise ConfigError(f"lm_eval: task file {path} has no 'task: NAME' key (groups are not supported; "
                              "list the group's tasks instead)")
        return TaskSpec(str(path), name, True)
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"lm_eval: include_path {include_path} is not a folder")
        if spec in _manager(include_path, False).all_subtasks:
            return TaskSpec(spec, spec, True)
    registry = _manager(include_path, True)
    if spec in registry.all_groups or spec in registry.all_tags:
        raise ConfigError(f"lm_eval: '{spec}' is an lm-eval group or tag, not a task; list its tasks instead")
    if spec not in registry.all_subtasks:
        guess = difflib.get_close_matches(spec, registry.all_subtasks, n=1, cutoff=0.6)
        where = f"in {include_path} or " if include_path else ""
        raise ConfigError(f"lm_eval: no task '{spec}' {where}in lm-eval's registry"
                          + (f"; did you mean '{guess[0]}'?" if guess else "")
                          + " (a task YAML file is named by its path)")
    return TaskSpec(spec, spec, False)


def _raw_config(task: TaskSpec, include_path: str | None) -> dict[str, Any]:
    if is_file(task.spec):
        return _read_yaml(Path(task.spec))
    entry = _manager(include_path, not task.local).task_index.get(task.name)
    if entry is None:
        return {}
    if entry.cfg:
        return dict(entry.cfg)
    return _read_yaml(Path(entry.yaml_path)) if entry.yaml_path else {}


def check_data_files(task: TaskSpec, include_path: str | None) -> None:
    """A local dataset's files exist, checked before lm-eval or datasets try to read them.

    Raises:
        ConfigError: names the missing file and the task file that lists it.
    """
    raw = _raw_config(task, include_path)
    if raw.get("dataset_path") not in LOCAL_BUILDERS:
        return
    files = (raw.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files]
    flat = [f for v in values for f in ([v] if isinstance(v, str) else list(v or []))]
    for f in flat:
        if "*" not in f and "://" not in f and not Path(f).expanduser().is_file():
            where = task.spec if is_file(task.spec) else f"the YAML file of task {task.name}"
            raise ConfigError(f"lm_eval: data file {f} of task {task.name} does not exist "
                              f"(dataset_kwargs.data_files in {where}; relative paths start in the current folder)")


@lru_cache(maxsize=32)
def load_task(spec: str, include_path: str | None, num_fewshot: int | None) -> LoadedTask:
    """The lm-eval Task of ``spec`` with its data loaded (once per process) and ``num_fewshot``
    examples in each prompt (None: the task's own number, 0 where it sets none).

    Raises:
        ConfigError: no such task, or its data cannot be loaded (one line naming the task).
    """
    task_spec = resolve(spec, include_path)
    check_data_files(task_spec, include_path)
    manager = _manager(include_path, not task_spec.local)
    try:
        loaded = manager.load([task_spec.spec])
    except ConfigError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise ConfigError(f"lm_eval: cannot load task {task_spec.name}: {type(exc).__name__}: {first}",
                          hint="offline (HF_DATASETS_OFFLINE=1) a Hub dataset must already be in the datasets "
                               "cache; a local task reads its files through dataset_path: json and "
                               "dataset_kwargs.data_files") from exc
    task = loaded["tasks"][task_spec.name]
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    return LoadedTask(task, {s: task.get_config(key) for s, key in SPLIT_KEYS.items()})


def primary_metric(task: Any) -> tuple[str, bool]:
    """The task's first metric under its first filter, as lm-eval reports it (``acc``; with a
    filter other than ``none``, ``exact_match,strict-match``), and whether higher is better."""
    better = task.higher_is_better()
    metric = next(iter(better))
    filters = task.get_config("filter_list") or []
    first = filters[0].get("name", "none") if filters and isinstance(filters[0], dict) else "none"
    return (metric if first == "none" else f"{metric},{first}"), bool(better[metric])


def labels(task: Any, limit: int | None) -> list[int]:
    """Class labels of the scored documents (the first ``limit``, in dataset order): the target
    choice's index for a multiple-choice task, 0 for every document of any other kind (its
    subsets are then plain seeded samples)."""
    docs = task.eval_docs
    n = len(docs) if limit is None else min(limit, len(docs))
    if task.get_config("output_type") != "multiple_choice":
        return [0] * n
    out = []
    for i in range(n):
        doc = docs[i]
        target = task.doc_to_target(doc)
        if isinstance(target, str):
            target = task.doc_to_choice(doc).index(target)
        out.append(int(target[0] if isinstance(target, Sequence) else target))
    return out
