"""The merge plan: every output tensor, what feeds it, or why it is copied or left out.

Everything that can be checked from headers and configs is checked here, before any tensor is
read, and every problem is reported at once.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mergekit_core.components import Architecture, MergeMethod
from mergekit_core.config import MergeSpec
from mergekit_core.engine.sources import (
    Contribution,
    Source,
    open_sources,
    resolve_name,
)
from mergekit_core.errors import MergeError
from mergekit_core.io.dtypes import is_float
from mergekit_core.io.safetensors_header import TensorInfo
from mergekit_core.plugins import PluginHost


@dataclass
class TensorPlan:
    """One output tensor. ``action``: ``merge``, ``copy`` (from the base, or from the only source
    that has it) or ``drop`` (not written); ``reason`` says why it is not merged."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int | None
    action: str
    contributions: list[Contribution | None] = field(default_factory=list)
    reason: str = ""
    module: str | None = None  # adapter output: the module path to write
    copy_from: int | None = None  # copy: None = from the base, else from this source
    base_key: str | None = None  # the base tensor that is this tensor's base value, when not ``name``

    @property
    def numel(self) -> int:
        return TensorInfo(self.name, self.shape, self.dtype).numel


class BaseCopy(NamedTuple):
    """An adapter's saved ``base_layer`` copy that an adapter output takes to be the base tensor."""

    name: str
    base_key: str
    source: int
    key: str


@dataclass
class MergePlan:
    spec: MergeSpec
    base: Any
    sources: list[Source]
    tensors: list[TensorPlan]
    output_kind: str
    architecture: Architecture
    method: MergeMethod
    notes: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    """Tied tensors the output writes as their own tensors (``untie_word_embeddings``)."""
    base_copies: list[BaseCopy] = field(default_factory=list)
    """Adapter output: base_layer copies to check against the base before writing."""

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.tensors if t.layer is not None})

    def by_action(self, action: str) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == action]

    def finish_model_files(self, directory: Path) -> dict[str, str]:
        """Make the copied ``config.json`` describe the output: ``tie_word_embeddings: false``
        (also in nested configs that set it, and in ``text_config``) when the plan unties a head.
        Returns file -> sha256 of the files it rewrote."""
        path = Path(directory) / "config.json"
        if not self.untied or not path.is_file():
            return {}
        from mergekit_core.io.writer import sha256_file

        config = json.loads(path.read_text())
        config["tie_word_embeddings"] = False
        for key, value in config.items():
            if isinstance(value, dict) and ("tie_word_embeddings" in value or key == "text_config"):
                value["tie_word_embeddings"] = False
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return {"config.json": sha256_file(path)}

    def close(self) -> None:
        for s in self.sources:
            s.close()
        if self.base is not None:
            self.base.close()


def _pattern_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not matched by any include pattern"
    return None


def choose_architecture(host: PluginHost, config: dict | None, names: list[str]) -> Architecture:
    for arch in sorted(host.components("architecture"), key=lambda a: -a.priority):
        if arch.matches(config, names):
            return arch
    raise MergeError("no architecture plugin recognises these tensor names")


def build_plan(spec: MergeSpec, host: PluginHost, method: MergeMethod) -> MergePlan:
    base, sources = open_sources(spec, host)
    try:
        return _build(spec, host, method, base, sources)
    except BaseException:
        for s in sources:
            s.close()
        if base is not None:
            base.close()
        raise


def _output_kind(spec: MergeSpec, base: Any, sources: list[Source], problems: list[str]) -> str:
    adapters = [s.is_adapter for s in sources]
    kind = spec.output.kind
    if kind == "auto":
        kind = "adapter" if all(adapters) else "model"
    if kind == "adapter" and not all(adapters):
        full = next(s.name for s in sources if not s.is_adapter)
        problems.append(f"output.kind adapter needs every source to be an adapter; {full} is a full model")
    if kind == "model" and base is None and any(adapters):
        problems.append("a model output from adapters needs base_model (the model the adapters were trained on)")
    return kind


def _build(spec: MergeSpec, host: PluginHost, method: MergeMethod, base: Any,
           sources: list[Source]) -> MergePlan:
    problems: list[str] = []
    n = len(sources)
    if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
        if method.max_sources == method.min_sources:
            takes = f"exactly {method.min_sources}"
        elif method.max_sources is None:
            takes = f"at least {method.min_sources}"
        else:
            takes = f"{method.min_sources} to {method.max_sources}"
        problems.append(f"{method.label} takes {takes} sources, got {n}")
    kind = _output_kind(spec, base, sources, problems)
    if base is None and not any(s.is_adapter for s in sources):
        if method.space == "delta" and not method.linear:
            problems.append(f"{method.label} works on task vectors and needs base_model")
        if any(t.name != "identity" for t in spec.transforms):
            problems.append("transforms change task vectors and need base_model")
    reference = base if base is not None else (sources[0].reader if not sources[0].is_adapter else None)
    config = getattr(base, "model_config", None) or getattr(sources[0].reader, "model_config", None)
    all_names = list(reference.infos()) if reference is not None else sorted(
        {n for s in sources for n in s.contributions})
    arch = choose_architecture(host, config, all_names)
    notes: list[str] = []
    infos: dict[str, TensorInfo] = reference.infos() if reference is not None else {}
    # tied tensors the reference does not store: name -> the stored tensor it is tied to
    loose = {n: p for n, p in arch.tied_weights(config) if n not in infos and p in infos}
    untie = spec.untie_word_embeddings
    if untie and kind == "adapter":
        problems.append("untie_word_embeddings: an adapter output cannot untie the base's embeddings; "
                        "write a full model (output.kind: model)")
    elif untie and not loose:
        notes.append("untie_word_embeddings: the base does not tie its embeddings; nothing to untie")
    _match_tied_targets(sources, loose, problems)
    copies: list[BaseCopy] = []
    if kind == "model":
        _tied_sources(sources, arch, set(infos) | (set(loose) if untie else set()))
    else:
        copies = _take_base_copies(sources, loose, base is not None, notes)

    if spec.merge_mode == "strict":
        sets = [set(s.contributions) for s in sources]
        for s, names in zip(sources, sets):
            extra = names - sets[0]
            missing = sets[0] - names
            if extra or missing:
                what = (f"has {sorted(extra)[0]!r} that {sources[0].name} lacks" if extra
                        else f"lacks {sorted(missing)[0]!r}")
                problems.append(f"merge_mode strict: source {s.name} {what} "
                                f"({len(extra) + len(missing)} tensors differ); use merge_mode common or union")
                break

    tensors: list[TensorPlan] = []
    untied: list[str] = []
    if kind == "adapter":
        names = sorted({n for s in sources for n, c in s.contributions.items()})
    else:
        names = list(infos)
        if untie:
            untied = [n for n in loose if _pattern_reason(n, [], spec.exclude) is None]
            notes += [f"{n}: untie_word_embeddings has no effect on it: {_pattern_reason(n, [], spec.exclude)}; "
                      "the output stays tied" for n in loose if n not in untied]
            names += untied
            notes += [f"{n}: the output is untied (untie_word_embeddings): {n} is written as its own tensor, "
                      f"merged from each source's {n} (a source that ties it: its {loose[n]}) on the base's "
                      f"{loose[n]}; config.json says tie_word_embeddings: false" for n in untied]
        orphans = sorted({n for s in sources for n in s.contributions} - set(names))
        for name in orphans:
            who = ", ".join(s.name for s in sources if name in s.contributions)
            reason = _pattern_reason(name, spec.include, spec.exclude)
            if name in loose and reason:
                notes.append(f"{name}: left out ({reason}): the base ties it to {loose[name]} and the output "
                             f"stays tied, so the {name} of {who} is not used")
            elif name in loose:
                problems.append(
                    f"{name}: a source changes it, but the base ties it to {loose[name]} and does not store it "
                    f"(changed by {who}); exclude it to keep the output tied (exclude: ['{name}'], or "
                    f"--exclude '{name}'), or write an untied output that keeps the sources' {name} "
                    "(untie_word_embeddings: true, or --untie-embeddings)"
                )
            else:
                notes.append(f"{name}: left out: in a source but not in the base model")
    for name in names:
        contributions = [s.contributions.get(name) for s in sources]
        present = [c for c in contributions if c is not None]
        base_key = loose.get(name)
        info = infos.get(base_key or name)
        shape, dtype = (info.shape, info.dtype) if info else _shape_from_sources(sources, contributions, name)
        plan = TensorPlan(name, shape, dtype, arch.layer_index(name), "merge", contributions, base_key=base_key)
        if kind == "adapter":
            plan.module = _module_of(sources, contributions, name)
        reason = _pattern_reason(name, spec.include, spec.exclude)
        if not present:
            plan.action, plan.reason = "copy", "no source changes it"
        elif reason:
            plan.action, plan.reason = "copy", reason
        elif not is_float(dtype):
            plan.action, plan.reason = "copy", "not floating point"
        elif spec.merge_mode == "common" and len(present) < n:
            plan.action, plan.reason = "copy", f"only in {len(present)} of {n} sources (merge_mode common)"
        if plan.action == "copy" and kind == "adapter":
            plan.action = "drop"  # an adapter holds only what changes
        elif plan.action == "copy" and base is None:
            plan.copy_from = next((i for i, c in enumerate(contributions) if c is not None), 0)
        if plan.action == "merge":
            _check_shapes(plan, sources, problems)
        tensors.append(plan)
    if kind == "adapter" and all(s.is_adapter for s in sources):  # else _output_kind said why
        _check_adapter_output(tensors, sources, base, problems)
    if tensors and not any(t.action == "merge" for t in tensors) and not problems:
        reasons = sorted({t.reason for t in tensors if t.reason})
        problems.append("nothing to merge: no tensor is merged (" + "; ".join(reasons[:3]) + "); are the sources "
                        "of the same architecture as the base, and do include/exclude leave anything?")
    if problems:
        raise MergeError("; ".join(problems))
    return MergePlan(spec, base, sources, tensors, kind, arch, method, notes, untied, copies)


def _match_tied_targets(sources: list[Source], loose: dict[str, str], problems: list[str]) -> None:
    """Adapter tensors that match no stored base tensor may change a tied one (a LoRA on the
    ``lm_head`` of a base that ties it); the rest are reported, one per source."""
    for s in sources:
        for target, c in s.unresolved.items():
            name = resolve_name(target, set(loose))
            if name is not None:
                s.contributions[name] = c
                continue
            problems.append(f"source {s.name} ({s.spec.path}): adapter tensor {target!r} matches no tensor of the "
                            "base model; is this adapter for this base?")
            break


def _tied_sources(sources: list[Source], arch: Architecture, wanted: set[str]) -> None:
    """A full-model source that ties a tensor (``lm_head`` to the embeddings) provides the tensor
    it is tied to, for every tied tensor the output holds, as ``transformers`` loads it: a copy it
    stores anyway (legacy ``.bin`` saves store both) is that copy, never a change of its own."""
    for s in sources:
        if s.is_adapter:
            continue
        for name, partner in arch.tied_weights(getattr(s.reader, "model_config", None)):
            if partner not in s.contributions:
                continue
            if name in wanted:
                s.contributions[name] = s.contributions[partner]
            else:
                s.contributions.pop(name, None)


def _take_base_copies(sources: list[Source], loose: dict[str, str], has_base: bool,
                      notes: list[str]) -> list[BaseCopy]:
    """Adapter output: an adapter's saved ``base_layer`` copy can only be the base's own tensor
    (a LoRA cannot carry a change of it), so the adapter's delta is taken against the base. The
    copies are returned to be checked against the base before anything is written; without a
    base they are assumed to be it, with a note."""
    copies: list[BaseCopy] = []
    for i, s in enumerate(sources):
        mine = []
        for name, c in list(s.contributions.items()):
            key = c.copy if c.kind == "delta" else (c.key if c.kind == "base_copy" else None)
            if key is None:
                continue
            mine.append(BaseCopy(name, loose.get(name, name), i, key))
            if c.kind == "delta":
                s.contributions[name] = Contribution("delta", c.key)
            else:
                del s.contributions[name]
        if mine and not has_base:
            more = f" and {len(mine) - 1} more" if len(mine) > 1 else ""
            notes.append(f"source {s.name}: its saved base_layer copy {mine[0].key!r}{more} is taken to be the base "
                         "model's own tensor (no base_model to check it against)")
        copies += mine
    return copies if has_base else []


def _shape_from_sources(sources: list[Source], contributions: list[Contribution | None],
                        name: str) -> tuple[tuple[int, ...], str]:
    for s, c in zip(sources, contributions):
        if c is None:
            continue
        if c.kind in ("weight", "replacement", "base_copy") or c.copy is not None:
            info = s.reader.infos()[c.key if c.copy is None else c.copy]
            return info.shape, info.dtype
        reader = s.reader
        mod, role = reader.targets()[c.key]
        if reader.is_low_rank(mod) and role == "weight":
            return reader.lora_factors(mod).shape, reader.infos()[next(iter(mod.keys.values()))].dtype
    raise MergeError(f"{name}: the shape of this tensor cannot be known without base_model; give one")


def _module_of(sources: list[Source], contributions: list[Contribution | None], name: str) -> str | None:
    for s, c in zip(sources, contributions):
        if c is not None and c.kind == "delta":
            mod, role = s.reader.targets()[c.key]
            return mod.path if role == "weight" else None
    return None


def _check_shapes(plan: TensorPlan, sources: list[Source], problems: list[str]) -> None:
    for s, c in zip(sources, plan.contributions):
        if c is None:
            continue
        if c.copy is not None:
            _check_shape(plan, s, s.reader.infos()[c.copy].shape, problems)
        if c.kind in ("weight", "replacement", "base_copy"):
            _check_shape(plan, s, s.reader.infos()[c.key].shape, problems)
        else:
            reader = s.reader
            mod, role = reader.targets()[c.key]
            if role != "weight" or not reader.is_low_rank(mod):
                continue
            f = reader.lora_factors(mod)
            numel = f.B.shape[0] * f.A.shape[1]
            if numel != plan.numel:
                problems.append(
                    f"{plan.name}: source {s.name} changes it with a LoRA of shape "
                    f"({f.B.shape[0]} x {f.A.shape[1]}), but the tensor is {list(plan.shape)}"
                )


def _check_shape(plan: TensorPlan, s: Source, shape: tuple[int, ...], problems: list[str]) -> None:
    if tuple(shape) != tuple(plan.shape):
        hint = (" (embedding matrices of different vocabulary sizes: exclude the tensor to keep the "
                "base's, or resize the models first)") if len(shape) == 2 and shape[1:] == plan.shape[1:] else ""
        problems.append(f"{plan.name}: source {s.name} has shape {list(shape)}, expected {list(plan.shape)}{hint}")


def _check_adapter_output(tensors: list[TensorPlan], sources: list[Source], base: Any,
                          problems: list[str]) -> None:
    for plan in tensors:
        if plan.action != "merge":
            continue
        kinds = {c.kind for c in plan.contributions if c is not None}
        if plan.module is None and "delta" in kinds:
            problems.append(
                f"{plan.name}: a bias change (lora_bias or IA3) cannot be written into a LoRA adapter; "
                "write a full model (output.kind: model) or exclude it"
            )
        if "replacement" in kinds and base is None:
            problems.append(f"{plan.name}: an adapter replaces it (modules_to_save); give base_model to merge "
                            "it, or exclude it")
    if base is None:
        needy = [s.name for s in sources if s.reader.config.use_dora or s.reader.peft_type == "IA3"]
        if needy:
            problems.append(f"source {needy[0]}: DoRA and IA3 deltas depend on the base weights; give base_model")
    fan = {s.reader.config.fan_in_fan_out for s in sources}
    if len(fan) > 1:
        problems.append("the adapters disagree on fan_in_fan_out; they were trained on different layer types")
