"""The component types that plugins provide.

A component is a small object with a ``name``, a one-line ``description`` and declared
``params``. Plugins subclass one of the kinds below and return instances from a hook::

    class Halve(MergeMethod):
        name = "halve"
        description = "Half of the sum of the task vectors."
        params = (Param("scale", 0.5, help="factor applied to the sum", min=0.0),)

        def merge(self, group, params, state=None):
            return params["scale"] * sum(group.tensors)

Component modules must stay light: import torch (or scikit-learn) inside the methods that need
it, never at the top of the module, so that ``mk --help`` and ``mk plugins list`` stay fast.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mergekit_core.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()
"""Sentinel default of a parameter that the user must give."""


_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _has_nonfinite(value: Any) -> bool:
    """NaN or infinity in a number, or in the numbers of a list or mapping (lambda lists)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_nonfinite(v) for v in value.values())
    return False


@dataclass(frozen=True)
class Param:
    """One declared parameter of a component.

    ``type`` is checked with ``isinstance`` (an ``int`` is accepted where ``float`` is asked);
    ``choices``, ``min`` and ``max`` are checked when set. ``None`` is accepted as a value only
    when it is the default.
    """

    name: str
    default: Any = REQUIRED
    help: str = ""
    type: type | tuple[type, ...] | None = None
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "required": self.required, "help": self.help}
        if not self.required:
            out["default"] = self.default
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out

    def check(self, owner: str, value: Any) -> Any:
        """Return ``value`` (ints widened to float where a float is asked) or raise ParameterError."""
        if value is None and self.default is None:
            return value
        expected = self.type
        if expected is not None:
            types = expected if isinstance(expected, tuple) else (expected,)
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if float in types and str not in types and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
                value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; users mean the number
            if isinstance(value, bool) and bool not in types:
                ok = False
            else:
                ok = isinstance(value, types)
            if not ok:
                names = " or ".join(t.__name__ for t in types)
                raise ParameterError(
                    f"{owner}: parameter '{self.name}' must be {names}, got {value!r}"
                )
        if _has_nonfinite(value):
            raise ParameterError(f"{owner}: parameter '{self.name}' must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(
                f"{owner}: parameter '{self.name}' must be one of "
                f"{', '.join(map(str, self.choices))}; got {value!r}"
            )
        if self.min is not None and isinstance(value, (int, float)) and value < self.min:
            raise ParameterError(f"{owner}: parameter '{self.name}' must be >= {self.min}, got {value!r}")
        if self.max is not None and isinstance(value, (int, float)) and value > self.max:
            raise ParameterError(f"{owner}: parameter '{self.name}' must be <= {self.max}, got {value!r}")
        return value


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name``, for 'did you mean' hints."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


class Component:
    """Base of every component kind."""

    kind: ClassVar[str] = "component"
    kind_label: ClassVar[str] = "component"

    name: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()

    def validate(self, params: dict[str, Any]) -> None:
        """Check relations between parameters; raise ParameterError. Override when needed."""

    @property
    def label(self) -> str:
        return f"{self.kind_label} '{self.name}'"

    def resolve_params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate ``given`` against the declared params and fill in defaults.

        Unknown or missing parameters are an error that lists the known ones.
        """
        given = dict(given or {})
        declared = {p.name: p for p in self.params}
        known = ", ".join(declared) or "(none)"
        unknown = [k for k in given if k not in declared]
        if unknown:
            key = unknown[0]
            guess = closest(key, declared)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ParameterError(
                f"{self.label}: unknown parameter '{key}'{hint}; known parameters: {known}"
            )
        missing = [p.name for p in self.params if p.required and p.name not in given]
        if missing:
            raise ParameterError(
                f"{self.label}: missing required parameter '{missing[0]}'; known parameters: {known}"
            )
        resolved = {}
        for p in self.params:
            value = given[p.name] if p.name in given else p.default
            resolved[p.name] = p.check(self.label, value)
        self.validate(resolved)
        return resolved

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "params": [p.describe() for p in self.params],
        }


# --------------------------------------------------------------------------- merge methods


@dataclass
class TensorGroup:
    """Everything a merge method sees for one output tensor.

    ``tensors`` holds one tensor per source: task vectors (deltas) when the method's ``space``
    is ``delta``, source weights when it is ``weights``; already transformed, in the compute
    dtype. ``coefficients`` holds one value per source from the lambda policy.
    """

    name: str
    layer: int | None
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    coefficients: list[float]
    source_names: list[str] = field(default_factory=list)
    seed: int = 0
    """Seed for random methods, derived from the merge's seed and the tensor name: draw with
    ``torch.Generator().manual_seed(group.seed + source_index)`` so a merge is reproducible."""


class PrepareContext:
    """What :meth:`MergeMethod.prepare` sees: the plan, the tensor groups the merge will see, and
    the plugin host (to look up an evaluator, say); ``plan.spec`` is the merge's spec."""

    plan: Any
    host: Any = None

    def groups(self) -> Iterator[TensorGroup]:
        """Every tensor to merge, in plan order, as the method's ``merge`` will receive it."""
        raise NotImplementedError

    def groups_of(self, names: set[str]) -> Iterator[TensorGroup]:
        """The groups of the tensors ``names`` only, in plan order. The engine reads only their
        sources (a second pass over a few tensors costs what they weigh); this default reads
        every group and skips the others."""
        for group in self.groups():
            if group.name in names:
                yield group


class MergeMethod(Component):
    """Combines the sources of one tensor into one merged tensor.

    ``space``: ``delta`` methods receive task vectors and return a merged task vector (the
    engine adds the base back); ``weights`` methods receive and return weights.
    ``linear``: the merged delta is ``sum(c_t * delta_t)`` with ``c_t`` from
    :meth:`linear_coefficients`; the engine then merges adapters by exact factor concatenation.
    """

    kind = "merge_method"
    kind_label = "merge method"
    space: ClassVar[Literal["delta", "weights"]] = "delta"
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int | None] = None
    linear: ClassVar[bool] = False
    needs_prepare: ClassVar[bool] = False
    default_lambda_policy: ClassVar[str] = "scalar"
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = None
    """Parameter name -> values that benchmarks (``mk digits bench``) tune on their validation
    split, every combination tried; None: the benchmark's own default (a lambda grid when the
    method has a ``lambda`` parameter, else the defaults); ``{}``: the defaults only."""

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> Any:
        """A global look at every tensor before streaming (thresholds, clustering); returns the
        state that :meth:`merge` receives. Each ``context.groups()`` call is one more read of the
        sources, so use as few passes as the method needs."""
        return None

    def finish(self, state: Any, error: BaseException | None) -> None:
        """Called once when a merge whose ``prepare`` ran ends: ``error`` is None when every
        tensor was merged and written (before the output is published: raising then publishes
        nothing), else the exception that stopped it. Commit or remove what ``prepare`` opened
        (mk-svd-hybrid's artifact). Not called by a dry run."""

    def linear_coefficients(self, group: TensorGroup, params: dict[str, Any]) -> list[float]:
        """For linear methods: the ``c_t`` with merged = sum(c_t * delta_t)."""
        raise NotImplementedError(f"{self.label} is not linear")

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            space=self.space,
            min_sources=self.min_sources,
            max_sources=self.max_sources,
            linear=self.linear,
        )
        return out


# --------------------------------------------------------------------------- the other kinds


class Transform(Component):
    """Changes one source's delta before merging (sparsify, mask, quantize).

    Random transforms must draw only from ``rng`` (a seeded ``torch.Generator``), so that a
    merge is reproducible from its metadata.
    """

    kind = "transform"
    kind_label = "transform"

    def apply(
        self, name: str, delta: torch.Tensor, params: dict[str, Any], rng: torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError


class LambdaPolicy(Component):
    """Decides the coefficient of each (source, tensor).

    ``values`` is the policy's state: what optimizers and sweeps search over. ``space`` names the
    searchable entries; ``initial_values`` builds the state from the resolved params.
    """

    kind = "lambda_policy"
    kind_label = "lambda policy"

    def initial_values(
        self, params: dict[str, Any], num_sources: int, layers: Sequence[int]
    ) -> dict[str, float]:
        raise NotImplementedError

    def space(
        self, params: dict[str, Any], num_sources: int, layers: Sequence[int]
    ) -> list[str]:
        """The keys of ``values`` that a search may change."""
        return list(self.initial_values(params, num_sources, layers))

    def resolve(
        self, tensor_name: str, layer: int | None, source_index: int, values: Mapping[str, float]
    ) -> float:
        raise NotImplementedError


@dataclass
class OptimizerContext:
    """What an optimizer may use: the plan, the evaluation, and ways to build merges.

    ``spec``: the merge's ``MergeSpec`` (sources, base, method, seed). ``setup``: the evaluation
    the config names (``evaluator``, ``evaluator_params``, ``eval_tasks``, ``split``) resolved
    and checked, or None when it names no evaluator. ``evaluate(values)``: each task's primary
    metric of the merge with those values (None without an evaluator). ``build_merged(values)``:
    the merged weights in memory. ``host``: the plugin host (``mergekit_core.api.open_task_vectors``
    takes it). ``progress(event, **fields)``: report steps to the command line (``start``,
    ``step``, ``end``; may be None). ``artifacts``: file name -> bytes the optimizer wants in the
    run bundle (its learned coefficients, its curve); ``report``: JSON-able facts recorded under
    ``optimizer`` in ``merge_metadata.json``.
    """

    plan: Any
    policy: LambdaPolicy
    policy_params: dict[str, Any]
    initial_values: dict[str, float]
    evaluate: Callable[[dict[str, float]], dict[str, float]] | None = None
    build_merged: Callable[[dict[str, float]], dict[str, Any]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    spec: Any = None
    setup: Any = None
    host: Any = None
    progress: Callable[..., None] | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class Optimizer(Component):
    """Chooses the lambda-policy values before the merge is streamed."""

    kind = "optimizer"
    kind_label = "optimizer"
    benchmark_runs: ClassVar[dict[str, dict[str, Any]]] = {}
    """Label -> parameters of the runs a benchmark (``mk digits bench``) makes with this optimizer
    on a task-arithmetic merge, one row each; ``{}``: none."""

    def optimize(self, context: OptimizerContext, params: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def check(self, context: OptimizerContext, params: dict[str, Any]) -> None:
        """Everything that can be checked before the optimizer runs (its data, its evaluator,
        saved files): ``mk merge --dry-run`` calls it, and every caller of ``optimize`` calls it
        first with the same context, so ``optimize`` may rely on it. Raise a ``ConfigError``
        naming the key and what to do."""

    def merge_method(self, params: dict[str, Any], configured: str) -> tuple[str, dict[str, Any]] | None:
        """The merge method (name, parameters) the learned values are for, when this optimizer's
        parameters decide it (AdaMerging++ learns coefficients of TIES' per-task vectors, so the
        merge is TIES with them); None: the config's method (``configured``). Raise a
        ``ConfigError`` when ``configured`` cannot be replaced."""
        return None

    def lambda_policy(self, params: dict[str, Any]) -> str | None:
        """The lambda policy whose values this optimizer returns, when it needs a particular one
        (AdaMerging's granularity); the config may leave ``lambda_policy`` out or name this one.
        None: the values are for whatever policy the config chose."""
        return None


@dataclass(frozen=True)
class TaskInfo:
    """A task an evaluator scores: its primary metric and whether higher is better."""

    name: str
    metric: str
    higher_is_better: bool = True


class Evaluator(Component):
    """Scores a merged model on named tasks and splits."""

    kind = "evaluator"
    kind_label = "evaluator"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    """The split names ``evaluate``, ``labels`` and the batches accept."""

    def tasks(self, params: dict[str, Any]) -> list[TaskInfo]:
        raise NotImplementedError

    def evaluate(
        self,
        model: Any,
        task: str,
        split: str,
        subset: Sequence[int] | None,
        params: dict[str, Any],
    ) -> dict[str, float]:
        """Metrics of ``model`` (a state dict, or a model directory) on ``task``/``split``, on the
        examples ``subset`` (indices into the split) or on all of them."""
        raise NotImplementedError

    def labels(self, task: str, split: str, params: dict[str, Any]) -> list[int]:
        """The labels of a split, in order: lets the core draw stratified, cached subsets."""
        raise NotImplementedError(f"{self.label} does not list its labels; subsets need them")

    def unlabeled_batches(self, task: str, split: str, params: dict[str, Any]) -> Iterator[Any]:
        """Optional: input batches without labels (what AdaMerging trains on)."""
        raise NotImplementedError(f"{self.label} gives no unlabeled batches")

    def labelled_batches(self, task: str, split: str, params: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
        """Optional: ``(inputs, labels)`` batches (what supervised coefficient learning trains on);
        ``labels``: a 1-D int64 tensor of class indices into ``forward``'s last dimension."""
        raise NotImplementedError(f"{self.label} gives no labelled batches")

    def forward(self, model: Any, task: str, inputs: Any, params: dict[str, Any]) -> Any:
        """Optional: the model's outputs on ``inputs``, differentiable in the model's tensors."""
        raise NotImplementedError(f"{self.label} has no forward pass")


class Search:
    """One running search: propose points, learn their scores (higher is better)."""

    def ask(self) -> dict[str, Any] | None:
        """The next point, or None when the search is done."""
        raise NotImplementedError

    def tell(self, point: dict[str, Any], score: float) -> None:
        raise NotImplementedError


class SearchStrategy(Component):
    """Makes :class:`Search` objects for sweeps."""

    kind = "search_strategy"
    kind_label = "search strategy"

    def start(self, space: dict[str, Any], params: dict[str, Any], seed: int) -> Search:
        raise NotImplementedError


class Executor(Component):
    """Where sweep trials run: in this process (``local``) or elsewhere."""

    kind = "executor"
    kind_label = "executor"

    def map(
        self, fn: Callable[[Any], Any], items: Iterable[Any], params: dict[str, Any]
    ) -> Iterator[Any]:
        raise NotImplementedError


class Format(Component):
    """A checkpoint format: ``sniff`` tells whether a path holds it; readers open it lazily."""

    kind = "format"
    kind_label = "format"
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = False
    priority: ClassVar[int] = 0
    """Higher wins when several formats sniff the same path."""

    def sniff(self, path: Any) -> bool:
        raise NotImplementedError

    def open(self, path: Any) -> Any:
        raise NotImplementedError


class Architecture(Component):
    """Knowledge of a model family: tensor name -> layer index, tied weights, module role."""

    kind = "architecture"
    kind_label = "architecture"
    priority: ClassVar[int] = 0

    def matches(self, model_config: Mapping[str, Any] | None, tensor_names: Sequence[str]) -> bool:
        raise NotImplementedError

    def layer_index(self, tensor_name: str) -> int | None:
        raise NotImplementedError

    def tied_weights(self, model_config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        return []

    def module_role(self, tensor_name: str) -> str:
        return "other"


COMPONENT_KINDS: dict[str, type[Component]] = {
    cls.kind: cls
    for cls in (
        MergeMethod,
        Transform,
        LambdaPolicy,
        Optimizer,
        Evaluator,
        SearchStrategy,
        Executor,
        Format,
        Architecture,
    )
}
"""Component kind -> its base class."""

KIND_HOOKS: dict[str, str] = {
    "merge_method": "mk_merge_methods",
    "transform": "mk_transforms",
    "lambda_policy": "mk_lambda_policies",
    "optimizer": "mk_optimizers",
    "evaluator": "mk_evaluators",
    "search_strategy": "mk_search_strategies",
    "executor": "mk_executors",
    "format": "mk_formats",
    "architecture": "mk_architectures",
}
"""Component kind -> the hook that returns components of that kind."""


def origin(component: Any) -> str:
    """Where a component comes from, for error messages: its distribution, else its module."""
    module = type(component).__module__
    if module.startswith("mergekit_core."):
        return "built in"
    import importlib.metadata

    try:
        dists = importlib.metadata.packages_distributions().get(module.split(".")[0]) or []
    except Exception:  # broken metadata must not hide the real error
        dists = []
    return f"plugin {dists[0]}" if dists else f"module {module}"
