"""mergekit's YAML translated into this project's config (``mk merge``, ``mk config convert``).

mergekit (arcee-ai/mergekit, read at 0.1.5) describes a merge by ``merge_method``, ``models`` (each
``{model, parameters}``), ``base_model``, global ``parameters``, ``dtype`` and ``out_dtype``. Its
parameters may be numbers, gradients (lists interpolated across layers) or lists of ``{filter,
value}`` entries, where ``filter`` is a substring of the tensor name; a model's own entries win
over the global ones (``mergekit.parameter_resolver``). :func:`translate` maps every one of these
onto mk's config so that the merge gives mergekit's numbers: weights go to the ``per_pattern``
lambda policy (filters as globs, gradients as they are), ``density`` and mergekit's conventions to
the mk-ties methods' own parameters (``weighted_election``, ``aggregate: weighted_mean``,
``min_kept``, ``scale``). What mk cannot do exactly (slices, passthrough, tokenizer surgery,
methods mk lacks) is refused: one :class:`ConfigError` line naming the key.

The mapping, key by key, and every convention difference: docs/mergekit-users.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core.errors import ConfigError
from mergekit_core.io.dtypes import USER_DTYPES

MERGEKIT_ONLY_KEYS = ("merge_method", "slices", "modules", "parameters", "dtype", "out_dtype",
                      "tokenizer_source", "tokenizer", "chat_template")
"""Top-level keys that only mergekit's schema has: any of them marks a config as mergekit's."""

TOP_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "slices", "modules",
            "tokenizer_source", "tokenizer", "chat_template"}
KNOWN_PARAMETERS = {"weight", "density", "gamma", "epsilon", "normalize", "rescale", "lambda", "int8_mask", "t",
                    "lambda_", "select_topk", "scale", "filter_wise", "eps", "maxiter", "tol", "max_iter",
                    "normalize_weights", "nuslerp_row_wise", "nuslerp_flatten", "r", "alpha"}
"""Parameter names of mergekit's methods; the ones a translated method does not read are ignored
(as mergekit ignores them) with a note, any other name is refused as a likely misspelling."""

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                       "della", "della_linear")
GEOMETRY_METHODS = ("model_stock", "multislerp", "karcher", "nuslerp", "nearswap", "sce", "ram", "ramplus_tl")
METHODS = ("linear", "slerp") + TASK_VECTOR_METHODS + GEOMETRY_METHODS
"""mergekit methods mk has; every other one (passthrough, arcee_fusion, ...) is refused."""

SLICES_REFUSED = ("mk merges whole models with the same layers; list them under 'models' instead (layer slices "
                  "and frankenmerges have no mk equivalent; one slice over every layer of every model is accepted)")
REFUSED_KEYS = {
    "modules": "mk merges one model at a time; per-module definitions have no mk equivalent",
    "tokenizer": "tokenizer surgery (new tokens, embedding alignment) has no mk equivalent; mk copies the "
                 "base's tokenizer files",
    "chat_template": "mk copies the base's tokenizer files as they are and sets no chat template",
}

# defaults of mergekit's generalized task arithmetic methods (mergekit.merge_methods.registry)
NORMALIZE_DEFAULT = {"task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False,
                     "breadcrumbs": False, "breadcrumbs_ties": False, "linear": True, "della": True,
                     "della_linear": False}
RESCALE_DEFAULT = {"task_arithmetic": False, "ties": False, "dare_ties": True, "dare_linear": True,
                   "breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": True}
USES = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    "task_arithmetic": {"weight", "normalize", "lambda", "int8_mask"},
    "ties": {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"},
    "dare_ties": {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"},
    "dare_linear": {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"},
    "breadcrumbs": {"weight", "density", "gamma", "normalize", "lambda", "int8_mask", "rescale"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "normalize", "lambda", "int8_mask", "rescale"},
    "della": {"weight", "density", "epsilon", "normalize", "lambda", "int8_mask", "rescale"},
    "della_linear": {"weight", "density", "epsilon", "normalize", "lambda", "int8_mask", "rescale"},
    "sce": {"select_topk", "int8_mask"},
    "model_stock": {"filter_wise"},
    "multislerp": {"weight", "normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "nuslerp": {"weight", "nuslerp_row_wise", "nuslerp_flatten"},
    "nearswap": {"t"},
    "ram": {"epsilon"},
    "ramplus_tl": {"epsilon", "r", "alpha"},
}
PER_MODEL = {"weight", "density", "gamma", "epsilon"}
"""Parameters mergekit reads per model (a model's own value wins over the global one)."""


@dataclass
class Translation:
    """mk's config for a mergekit config, and what the reader should know about it."""

    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def looks_like_mergekit(data: Any) -> bool:
    """Whether a loaded YAML document is written in mergekit's schema rather than mk's."""
    if not isinstance(data, Mapping):
        return False
    if any(key in data for key in MERGEKIT_ONLY_KEYS):
        return True
    models = data.get("models")
    return isinstance(models, list) and any(isinstance(m, Mapping) and "model" in m for m in models)


def _shown(value: Any) -> str:
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _glob(substring: str) -> str:
    """mergekit's substring filter as a glob over the whole name (glob characters escaped)."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in substring)
    return f"*{escaped}*"


class _Translator:
    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path | None) -> None:
        self.data, self.where, self.base_dir = data, where, base_dir
        self.notes: list[str] = []

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.where}: {key}: {message}")

    # ------------------------------------------------------------------ values

    def setting(self, key: str, value: Any, kind: str = "number") -> list[tuple[str | None, Any]]:
        """A mergekit parameter setting as ``[(glob or None, number or gradient list)]`` in order."""
        entries = value if isinstance(value, list) and value and all(isinstance(e, Mapping) for e in value) \
            else [value] if isinstance(value, Mapping) else None
        if entries is None:
            return [(None, self.scalar_or_gradient(key, value, kind))]
        out = []
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            unknown = sorted(set(map(str, entry)) - {"filter", "value"})
            if unknown:
                self.fail(where, f"unknown key '{_shown(unknown[0])}' (a conditional value has filter and value)")
            if "value" not in entry:
                self.fail(where, "a conditional value needs 'value'")
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                self.fail(f"{where}.filter", f"must be a substring of tensor names, got {flt!r}")
            pattern = None if flt in (None, "*") else _glob(flt)
            out.append((pattern, self.scalar_or_gradient(f"{where}.value", entry["value"], kind)))
        return out

    def scalar_or_gradient(self, key: str, value: Any, kind: str) -> Any:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            self.fail(key, f"mk takes one true or false for the whole merge, got {value!r}")
        if _number(value):
            return float(value)
        if isinstance(value, list) and value and all(_number(v) for v in value):
            return [float(v) for v in value]
        self.fail(key, f"must be a number, a list of numbers across the layers, or filter/value entries; "
                       f"got {value!r}")
        return None

    def single(self, key: str, value: Any, kind: str = "number") -> Any:
        """A setting mk takes once for the whole merge: no filter, no gradient."""
        entries = self.setting(key, value, kind)
        if len(entries) != 1 or entries[0][0] is not None or isinstance(entries[0][1], list):
            self.fail(key, "mk takes one value for the whole merge here (no filter, no list across layers)")
        return entries[0][1]

    # ------------------------------------------------------------------ models

    def model_ref(self, key: str, value: Any) -> str:
        if isinstance(value, Mapping):
            if value.get("lora") is not None:
                self.fail(f"{key}.lora", "a LoRA applied to a model has no mk equivalent; merge the adapter itself "
                                         "as a source (mk merges adapters), or apply it first")
            inner = value.get("model")
            if isinstance(inner, Mapping) and isinstance(inner.get("path"), str):
                rev = inner.get("revision")
                return inner["path"] + (f"@{rev}" if rev else "")
            if isinstance(inner, str):
                value = inner
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a model path or Hub ID, got {value!r}")
        if "+" in value and not Path(value).exists():
            self.fail(key, f"'{_shown(value)}' applies a LoRA to a model ('+'), which has no mk equivalent; "
                           "merge the adapter itself as a source, or apply it first")
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None and (self.base_dir / path).exists():
            return str((self.base_dir / path).absolute())  # mergekit reads paths from the working directory
        return value

    def whole_model_slice(self) -> None:
        """mergekit's one-slice form over every layer (``slices: [{sources: [{model, layer_range:
        [0, N]}]}]``, how its slerp example is written) read as ``models``; anything else is refused."""
        slices = self.data["slices"]
        if self.data.get("models") is not None:
            self.fail("slices", "give 'models' or 'slices', not both (mergekit refuses both too)")
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
            self.fail("slices", SLICES_REFUSED)
        out_slice = slices[0]
        unknown = sorted(set(map(str, out_slice)) - {"sources", "parameters", "base_model"})
        if unknown:
            self.fail(f"slices[0].{unknown[0]}", "has no mk equivalent")
        if out_slice.get("base_model") not in (None, self.data.get("base_model")):
            self.fail("slices[0].base_model", "differs from base_model; mk merges with one base")
        sources = out_slice.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(x, Mapping) for x in sources):
            self.fail("slices[0].sources", "give a list of {model, layer_range}")
        ranges = {tuple(x.get("layer_range") or ()) for x in sources}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != 0:
            self.fail("slices", SLICES_REFUSED)
        layers = next(iter(ranges))[1]
        models = []
        for i, x in enumerate(sources):
            unknown = sorted(set(map(str, x)) - {"model", "layer_range", "parameters"})
            if unknown:
                self.fail(f"slices[0].sources[{i}].{unknown[0]}", "has no mk equivalent")
            ref = self.model_ref(f"slices[0].sources[{i}].model", x.get("model"))
            count = _layer_count(ref)
            if count is None:
                self.fail("slices", f"cannot read how many layers {_shown(ref)} has (its config.json), so cannot "
                                    f"tell whether layer_range [0, {layers}] is the whole model; list the models "
                                    "under 'models' instead")
            if count != layers:
                self.fail("slices", f"layer_range [0, {layers}] of {_shown(ref)} is not its {count} layers; "
                                    + SLICES_REFUSED)
            models.append({"model": x.get("model"), **({"parameters": x["parameters"]} if "parameters" in x else {})})
        self.data = {**{k: v for k, v in self.data.items() if k != "slices"}, "models": models}
        if out_slice.get("parameters"):
            self.slice_parameters = out_slice["parameters"]
        self.notes.append(f"slices: one slice over all {layers} layers of every model, read as models")

    def models(self) -> list[dict[str, Any]]:
        raw = self.data.get("models")
        if not isinstance(raw, list) or not raw:
            self.fail("models", "give a list of {model: PATH_OR_HUB_ID, parameters: {...}}")
        out = []
        for i, entry in enumerate(raw):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry:
                self.fail(f"models[{i}]", "must be {model: PATH_OR_HUB_ID, parameters: {...}}")
            unknown = sorted(set(map(str, entry)) - {"model", "parameters"})
            if unknown:
                self.fail(f"models[{i}]", f"unknown key '{_shown(unknown[0])}' (a model has model and parameters)")
            params = entry.get("parameters") or {}
            if not isinstance(params, Mapping):
                self.fail(f"models[{i}].parameters", "must be a mapping of parameter names to values")
            out.append({"ref": self.model_ref(f"models[{i}].model", entry["model"]), "params": dict(params),
                        "key": f"models[{i}].parameters"})
        return out

    # ------------------------------------------------------------------ the whole config

    def translate(self) -> Translation:
        d = self.data
        unknown = sorted(str(k) for k in d if k not in TOP_KEYS)
        if unknown:
            self.fail(unknown[0], "not a key of mergekit's config (or mk's: do not mix the two)")
        for key, why in REFUSED_KEYS.items():
            if d.get(key) is not None:
                self.fail(key, why)
        self.slice_parameters: Any = None
        if d.get("slices") is not None:
            self.whole_model_slice()
            d = self.data
        tok = d.get("tokenizer_source")
        if tok is not None:
            if tok != "base":
                self.fail("tokenizer_source", "only 'base' has an mk equivalent (mk copies the base's tokenizer "
                                              "files); a union or another model's vocabulary needs embedding surgery")
            self.notes.append("tokenizer_source: base: mk copies the base's tokenizer files; sources whose "
                              "vocabulary differs in size are refused (mergekit would realign their embeddings)")
        method = d.get("merge_method")
        if not isinstance(method, str):
            self.fail("merge_method", "missing; name one of " + ", ".join(METHODS))
        if method not in METHODS:
            self.fail("merge_method", f"'{_shown(method)}' has no mk equivalent; mk has " + ", ".join(METHODS))
        self.method = method
        params = d.get("parameters") or {}
        if not isinstance(params, Mapping):
            self.fail("parameters", "must be a mapping of parameter names to values")
        self.globals = dict(params)
        if self.slice_parameters is not None:  # a slice's parameters win over the global ones
            if not isinstance(self.slice_parameters, Mapping):
                self.fail("slices[0].parameters", "must be a mapping of parameter names to values")
            for name, value in self.slice_parameters.items():
                conditional = isinstance(value, Mapping) or (
                    isinstance(value, list) and any(isinstance(e, Mapping) for e in value))
                if name in self.globals and conditional:  # entries no filter matches fall through
                    self.globals[name] = _entries(value) + _entries(self.globals[name])
                else:
                    self.globals[name] = value
        models = self.models()
        for key, scope in [("parameters", self.globals)] + [(m["key"], m["params"]) for m in models]:
            for name in scope:
                if name not in KNOWN_PARAMETERS:
                    self.fail(f"{key}.{_shown(name)}", "not a parameter of any mergekit method")
                if name not in USES[method]:
                    self.notes.append(f"{key}.{name}: {method} does not read it (mergekit ignores it too)")
                elif name not in PER_MODEL and key != "parameters":
                    self.notes.append(f"{key}.{name}: mergekit reads {name} from the global parameters only; "
                                      "ignored here")
        base = d.get("base_model")
        base_ref = self.model_ref("base_model", base) if base is not None else None
        if "int8_mask" in self.globals and method in TASK_VECTOR_METHODS + ("sce",):
            self.notes.append("parameters.int8_mask: ignored (a memory setting of mergekit's masks; "
                              "mk's masks are booleans)")
        config: dict[str, Any] = {}
        if method == "linear":
            config.update(self.linear(models, base_ref))
        elif method == "slerp":
            config.update(self.slerp(models, base_ref))
        elif method in GEOMETRY_METHODS:
            config.update(self.geometry(models, base_ref))
        else:
            config.update(self.task_vectors(models, base_ref))
        config.update(self.dtypes())
        return Translation(config, self.notes)

    def sources(self, models: list[dict[str, Any]]) -> list[dict[str, str]]:
        names: list[str] = []
        out = []
        for m in models:
            name = m["ref"].rstrip("/").split("/")[-1].split("@")[0] or "model"
            stem, k = name, 2
            while name in names:
                name, k = f"{stem}_{k}", k + 1
            names.append(name)
            out.append({"name": name, "path": m["ref"]})
        return out

    def dtypes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def dtype(key: str) -> str | None:
            value = self.data.get(key)
            if value is None:
                return None
            name = str(value).removeprefix("torch.")
            if name.lower() not in USER_DTYPES:
                self.fail(key, f"unknown dtype {value!r}; use bfloat16, float16, float32 or float64")
            return USER_DTYPES[name.lower()]

        compute, written = dtype("dtype"), dtype("out_dtype")
        if written or compute:
            out["output"] = {"dtype": written or compute}
        if compute in ("float32", "float64"):
            out["compute_dtype"] = compute
        elif compute is not None:
            self.notes.append(f"dtype: {compute}: mergekit computes in {compute}; mk computes in float32 and "
                              f"writes {written or compute} (values may differ in the last {compute} bit)")
        return out

    # ------------------------------------------------------------------ per-method

    def per_source(self, name: str, models: list[dict[str, Any]], default: Any = None
                   ) -> tuple[list[dict[str, Any]], list[bool]]:
        """Rules for a per-model parameter: each model's own entries (its own sources only), then
        the global ones, then ``default``. Returns (rules, covered): covered[t] is False when model
        t has no entry without filter and there is no default (mergekit would stop on a tensor)."""
        n = len(models)
        rules: list[dict[str, Any]] = []
        covered = [False] * n
        for t, m in enumerate(models):
            if name in m["params"]:
                for pattern, v in self.setting(f"{m['key']}.{name}", m["params"][name]):
                    values: list[Any] = [None] * n
                    values[t] = v
                    rules.append({**({"match": pattern} if pattern else {}), "values": values})
                    covered[t] = covered[t] or pattern is None
        if name in self.globals:
            for pattern, v in self.setting(f"parameters.{name}", self.globals[name]):
                rules.append({**({"match": pattern} if pattern else {}), "value": v})
                if pattern is None:
                    covered = [True] * n
        if default is not None and not all(covered):
            rules.append({"value": default})
            covered = [True] * n
        return _simplified(rules, n), covered

    def weights(self, models: list[dict[str, Any]], scale: float = 1.0) -> dict[str, Any]:
        rules, covered = self.per_source("weight", models)
        if not all(covered):
            missing = models[covered.index(False)]["key"]
            self.fail(f"{missing}.weight", "mergekit needs a weight for every tensor of every model: give a number "
                                           "(or an entry without filter) here or in the global parameters")
        if scale != 1.0:
            rules = [_scaled(r, scale) for r in rules]
        if all("match" not in r for r in rules):  # one value per source everywhere: per_task says it plainly
            firsts = [next(r["value"] if "value" in r else r["values"][t] for r in rules
                           if "value" in r or r["values"][t] is not None) for t in range(len(models))]
            if not any(isinstance(v, list) for v in firsts):
                return {"name": "per_task", "params": {"lambdas": firsts}}
        return {"name": "per_pattern", "params": {"rules": rules}}

    def flag(self, name: str, default: bool) -> bool:
        return bool(self.single(f"parameters.{name}", self.globals[name], "bool")) if name in self.globals else default

    def linear(self, models: list[dict[str, Any]], base_ref: str | None) -> dict[str, Any]:
        if base_ref is not None:
            if any(m["ref"] == base_ref for m in models):
                self.notes.append("base_model: mergekit's linear treats the base as one more input; it is "
                                  "already among the models")
            elif "weight" in self.globals:
                models = models + [{"ref": base_ref, "params": {}, "key": "base_model"}]
                self.notes.append("base_model: mergekit's linear merges the base as one more input (with the "
                                  "global weight); it is the last source here")
            else:
                self.fail("base_model", "mergekit's linear merges the base as one more input and needs a weight "
                                        "for it: list it under models with a weight (or give parameters.weight)")
        normalize = self.flag("normalize", True)
        return {"sources": self.sources(models), "method": {"name": "weighted", "params": {"normalize": normalize}},
                "lambda_policy": self.weights(models)}

    def slerp(self, models: list[dict[str, Any]], base_ref: str | None) -> dict[str, Any]:
        if base_ref is None:
            self.fail("base_model", "slerp interpolates from the base model to the other one: give base_model")
        others = [m for m in models if m["ref"] != base_ref]
        if len(others) != 1:
            self.fail("models", f"slerp takes the base and exactly one other model, got {len(others)} others")
        if "t" not in self.globals:
            self.fail("parameters.t", "slerp needs t (0: the base, 1: the other model)")
        rules = [{**({"match": p} if p else {}), "value": v}
                 for p, v in self.setting("parameters.t", self.globals["t"])]
        t: Any = rules[0]["value"] if len(rules) == 1 and "match" not in rules[0] and not isinstance(
            rules[0]["value"], list) else rules
        if isinstance(t, list) and all("match" in r for r in rules):
            self.fail("parameters.t", "mergekit needs t for every tensor: add an entry without filter")
        base = {"ref": base_ref, "params": {}, "key": "base_model"}
        return {"sources": self.sources([base, others[0]]), "method": {"name": "slerp", "params": {"t": t}}}

    def task_vectors(self, models: list[dict[str, Any]], base_ref: str | None) -> dict[str, Any]:
        method = self.method
        if base_ref is None:
            self.fail("base_model", f"{method} merges task vectors (model minus base): give base_model "
                                    "(mergekit requires it too)")
        if any(m["ref"] == base_ref for m in models):
            self.notes.append("models: the base model is also listed; as in mergekit, it is the base only "
                              "(its parameters are not read)")
            models = [m for m in models if m["ref"] != base_ref]
        if not models:
            self.fail("models", "list at least one model besides the base")
        normalize = self.flag("normalize", NORMALIZE_DEFAULT[method])
        rescale = self.flag("rescale", RESCALE_DEFAULT[method]) if method != "task_arithmetic" else False
        lam = float(self.single("parameters.lambda", self.globals["lambda"])) if "lambda" in self.globals else 1.0
        out: dict[str, Any] = {"sources": self.sources(models), "base_model": base_ref}
        if method == "task_arithmetic":
            if normalize:
                if lam != 1.0:
                    self.fail("parameters.lambda", "with normalize: true mk's weighted mean has no scale; "
                                                   "leave lambda at 1 or normalize false")
                out["method"] = {"name": "weighted", "params": {"normalize": True}}
                out["lambda_policy"] = self.weights(models)
            else:
                out["method"] = {"name": "task_arithmetic", "params": {}}
                out["lambda_policy"] = self.weights(models, scale=lam)
            return out
        if rescale and method not in ("dare_ties", "dare_linear", "della", "della_linear"):
            self.fail("parameters.rescale", f"{method} in mk does not rescale after trimming; set it false")
        density, _ = self.per_source("density", models, default=1.0)
        params: dict[str, Any] = {"density": _plain(density), "scale": lam}
        if method in ("dare_ties", "dare_linear", "della", "della_linear"):
            params["rescale"] = "l1" if rescale else "none"
            self.notes.append(f"{method}: random drops come from mk's seeded generator (seed), mergekit's from "
                              "torch's global one: the same distribution, not the same masks")
        if method in ("della", "della_linear"):
            epsilon = _plain(self.per_source("epsilon", models, default=0.15)[0])
            if not _number(epsilon):
                self.fail("epsilon", "mk's della takes one epsilon for every source and tensor; give one number")
            params["epsilon"] = epsilon
        if method in ("breadcrumbs", "breadcrumbs_ties"):
            gamma, _ = self.per_source("gamma", models, default=0.01)
            gamma = _plain(gamma)
            if not _number(gamma):
                self.fail("gamma", "mk's breadcrumbs drops one outlier fraction (its beta) from every source and "
                                   "tensor; give one number in the global parameters")
            params["beta"] = gamma
        if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
            params.update(sign_method="mass", sign_tie="positive", weighted_election=True,
                          aggregate="weighted_mean" if normalize else "sum")
        else:
            params["normalize"] = normalize
        if method == "ties":
            params.update(trim_scope="tensor", min_kept=1)
        out["method"] = {"name": method, "params": params}
        out["lambda_policy"] = self.weights(models)
        return out


    def geometry(self, models: list[dict[str, Any]], base_ref: str | None) -> dict[str, Any]:
        """model_stock, multislerp, karcher, nuslerp, nearswap (mk's built-in geometry methods),
        sce, ram and ramplus_tl (mk-ties), with mergekit's defaults and contracts."""
        method = self.method
        needs_base = method in ("model_stock", "nearswap", "sce", "ram", "ramplus_tl")
        if needs_base and base_ref is None:
            self.fail("base_model", f"{method} needs base_model (mergekit requires it too)")
        if method == "karcher":  # mergekit's karcher averages every input, the base included
            if base_ref is not None and not any(m["ref"] == base_ref for m in models):
                models = models + [{"ref": base_ref, "params": {}, "key": "base_model"}]
                self.notes.append("base_model: mergekit's karcher averages the base with the models; it is the "
                                  "last source here")
            base_ref = None
        elif base_ref is not None and any(m["ref"] == base_ref for m in models):
            self.notes.append("models: the base model is also listed; as in mergekit, it is the base only")
            models = [m for m in models if m["ref"] != base_ref]
        counts = {"model_stock": (2, None), "nuslerp": (2, 2), "nearswap": (1, 1), "karcher": (1, None)}
        low, high = counts.get(method, (1, None))
        if len(models) < low or (high is not None and len(models) > high):
            takes = f"exactly {low}" if low == high else f"at least {low}"
            self.fail("models", f"{method} takes {takes} model(s) besides the base, got {len(models)}")
        g = self.globals
        params: dict[str, Any] = {}
        policy: dict[str, Any] | None = None
        if method == "model_stock":
            params["filter_wise"] = self.flag("filter_wise", False)
        elif method == "multislerp":
            params["normalize_weights"] = self.flag("normalize_weights", True)
            if "eps" in g:
                params["eps"] = float(self.single("parameters.eps", g["eps"]))
            policy = self.weights(models)
        elif method == "karcher":
            if "max_iter" in g:
                params["max_iter"] = int(self.single("parameters.max_iter", g["max_iter"]))
            if "tol" in g:
                params["tol"] = float(self.single("parameters.tol", g["tol"]))
        elif method == "nuslerp":
            params["flatten"] = self.flag("nuslerp_flatten", True)
            params["row_wise"] = self.flag("nuslerp_row_wise", False)
            policy = self.weights(models)
        elif method == "nearswap":
            if "t" not in g:
                self.fail("parameters.t", "nearswap needs t (the distance below which the model's value is taken)")
            params["t"] = float(self.single("parameters.t", g["t"]))
        elif method == "sce":
            if "select_topk" in g:
                params["select_topk"] = float(self.single("parameters.select_topk", g["select_topk"]))
        else:  # ram, ramplus_tl
            for name in ("epsilon", "r", "alpha"):
                if name in g and name in USES[method]:
                    params[name] = float(self.single(f"parameters.{name}", g[name]))
        out: dict[str, Any] = {"sources": self.sources(models), "method": {"name": method, "params": params}}
        if base_ref is not None:
            out["base_model"] = base_ref
        if policy is not None:
            out["lambda_policy"] = policy
        return out


def _entries(value: Any) -> list[Any]:
    """A mergekit setting as its list of ``{filter, value}`` entries (to chain two scopes)."""
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list) and any(isinstance(e, Mapping) for e in value):
        return list(value)
    return [{"value": value}]


def _layer_count(ref: str) -> int | None:
    """The number of layers of a model (``num_hidden_layers`` of its config.json): a local folder,
    or a Hub ID whose config.json is fetched alone (a few KB; the cache and offline mode as usual)."""
    import json

    path = Path(ref).expanduser()
    config = path / "config.json" if path.is_dir() else None
    if config is None:
        from mergekit_core.io import hub

        if not hub.is_repo_id(ref):
            return None
        try:
            from huggingface_hub import hf_hub_download

            repo, _, revision = ref.partition("@")
            config = Path(hf_hub_download(repo, "config.json", revision=revision or None))
        except Exception:  # not installed, offline and not cached, no such repo: the caller refuses
            return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    for holder in (data, data.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(holder.get(key), int):
                return holder[key]
    return None


def _scaled(rule: dict[str, Any], scale: float) -> dict[str, Any]:
    def mul(v: Any) -> Any:
        if v is None:
            return None
        return [x * scale for x in v] if isinstance(v, list) else v * scale

    out = dict(rule)
    if "value" in out:
        out["value"] = mul(out["value"])
    else:
        out["values"] = [mul(v) for v in out["values"]]
    return out


def _simplified(rules: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Consecutive catch-all rules with one value each for distinct sources become one rule."""
    out: list[dict[str, Any]] = []
    for rule in rules:
        prev = out[-1] if out else None
        if (prev is not None and "match" not in rule and "match" not in prev and "values" in rule
                and "values" in prev and all(a is None or b is None for a, b in zip(prev["values"], rule["values"]))):
            prev["values"] = [a if a is not None else b for a, b in zip(prev["values"], rule["values"])]
            continue
        out.append({k: (list(v) if isinstance(v, list) else v) for k, v in rule.items()})
    return out


def _plain(rules: list[dict[str, Any]]) -> Any:
    """One number when every source gets the same plain number, else the rules."""
    if len(rules) == 1 and "match" not in rules[0]:
        rule = rules[0]
        if "value" in rule and _number(rule["value"]):
            return rule["value"]
        vals = rule.get("values") or []
        if vals and all(_number(v) for v in vals) and len(set(vals)) == 1:
            return vals[0]
    return rules


def translate(data: Mapping[str, Any], where: str = "config", base_dir: Path | None = None) -> Translation:
    """mk's config for mergekit's ``data``.

    ``where``: the file, for messages. ``base_dir``: the folder mergekit would read relative model
    paths from (the working directory); a relative path that exists there is made absolute.

    Raises:
        ConfigError: one line naming the key that has no mk equivalent, and why.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    return _Translator(data, where, base_dir).translate()
