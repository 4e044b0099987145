"""PEFT adapter directories: keys -> modules, factors, and the exact dense delta per base weight.

Every formula follows shared/reference/peft-adapter-formats.md §1.5 (checked against peft 0.21.2
in tests/test_peft_interop.py). Deltas are in the base weight's own layout and in float32.

Full tensors saved beside the factors (``modules_to_save`` copies, bias values with
``bias: all``) are *replacements* of base tensors, not deltas; they are listed in
:attr:`AdapterReader.replacements` and never dropped silently. ``<module>.base_layer.weight`` /
``.bias`` copies (saved when an embedding name is in ``target_modules``) are the wrapped layer's
base weights: peft loads them into the base layer and applies the adapter on top, so they are
listed apart, in :attr:`AdapterReader.base_copies`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_core.errors import FormatError
from mergekit_core.io.peft_config import AdapterConfig
from mergekit_core.io.readers import (
    CheckpointReader,
    SafetensorsReader,
    TorchReader,
    read_json,
)
from mergekit_core.io.safetensors_header import TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# Suffix -> (peft_type, factor name). Longest suffixes first so that 'lora_B.bias' wins over '.bias'.
FACTOR_SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_A.weight": ("LORA", "A"),
    "lora_B.weight": ("LORA", "B"),
    "lora_B.bias": ("LORA", "B_bias"),
    "lora_embedding_A": ("LORA", "emb_A"),
    "lora_embedding_B": ("LORA", "emb_B"),
    "lora_magnitude_vector": ("LORA", "magnitude"),
    "ia3_l": ("IA3", "l"),
    "lokr_w1": ("LOKR", "w1"),
    "lokr_w1_a": ("LOKR", "w1_a"),
    "lokr_w1_b": ("LOKR", "w1_b"),
    "lokr_w2": ("LOKR", "w2"),
    "lokr_w2_a": ("LOKR", "w2_a"),
    "lokr_w2_b": ("LOKR", "w2_b"),
    "lokr_t2": ("LOKR", "t2"),
    "hada_w1_a": ("LOHA", "w1_a"),
    "hada_w1_b": ("LOHA", "w1_b"),
    "hada_w2_a": ("LOHA", "w2_a"),
    "hada_w2_b": ("LOHA", "w2_b"),
    "hada_t1": ("LOHA", "t1"),
    "hada_t2": ("LOHA", "t2"),
}


@dataclass
class AdapterModule:
    """One wrapped module of the base model and the adapter factors that change it."""

    path: str
    peft_type: str
    keys: dict[str, str] = field(default_factory=dict)
    scale: float = 1.0
    rank: int = 0

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.path}.bias"

    @property
    def layer_type(self) -> str:
        if "emb_A" in self.keys:
            return "embedding"
        return "other"


@dataclass
class LoraFactors:
    """``delta_BA = scale * B @ A`` (B: (out, r), A: (r, in), flattened for convs).

    ``transpose``: the base weight is stored as (in, out) (fan_in_fan_out, embeddings);
    ``shape``: the base weight's shape, when the delta must be reshaped (convs).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transpose: bool
    shape: tuple[int, ...]

    def dense(self) -> torch.Tensor:
        delta = (self.B.float() @ self.A.float()) * self.scale
        if self.transpose:
            delta = delta.T
        return delta.reshape(self.shape)


def _split_key(key: str) -> tuple[str, str | None, str | None]:
    """(module path, factor name, peft type) for a factor key; (relative name, None, None) otherwise."""
    rel = key.removeprefix(PREFIX)
    for suffix, (ptype, factor) in FACTOR_SUFFIXES.items():
        if rel.endswith("." + suffix):
            return rel[: -len(suffix) - 1], factor, ptype
    return rel, None, None


class AdapterReader:
    """A PEFT adapter directory, read lazily: headers and config at open, factors on request."""

    format_name = "peft_adapter"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config = AdapterConfig.from_dict(read_json(self.path / CONFIG_FILE, CONFIG_FILE),
                                              self.path / CONFIG_FILE)
        self.raw = self._open_weights()
        self.modules: dict[str, AdapterModule] = {}
        self.replacements: dict[str, str] = {}
        self.base_copies: dict[str, str] = {}  # base tensor name -> key of its saved base_layer copy
        self._targets: dict[str, tuple[AdapterModule, str]] | None = None
        self._index_keys()

    def _open_weights(self) -> CheckpointReader:
        st, pt = (self.path / f for f in WEIGHT_FILES)
        if st.is_file():
            return SafetensorsReader.from_file(st)
        if pt.is_file():
            return TorchReader(self.path, [pt])
        raise FormatError(f"{self.path}: adapter weights are missing (expected {' or '.join(WEIGHT_FILES)})")

    def _index_keys(self) -> None:
        cfg = self.config
        for key, info in self.raw.infos().items():
            module, factor, ptype = _split_key(key)
            if factor is None:
                self._index_replacement(key, module)
                continue
            if ptype != cfg.peft_type:
                raise FormatError(
                    f"{self.path}: tensor {key!r} belongs to a {ptype} adapter but the config says "
                    f"peft_type {cfg.peft_type}; the weights do not match adapter_config.json"
                )
            mod = self.modules.setdefault(module, AdapterModule(module, ptype))
            mod.keys[factor] = key
        for mod in self.modules.values():
            self._check_module(mod)

    def _index_replacement(self, key: str, rel: str) -> None:
        cfg = self.config
        module, _, leaf = rel.rpartition(".")
        if module.endswith(".base_layer"):
            self.base_copies[f"{module.removesuffix('.base_layer')}.{leaf}"] = key
        elif cfg.saves_module(module):
            self.replacements[rel] = key
        elif leaf == "bias" and cfg.bias in ("all", "lora_only"):
            self.replacements[rel] = key
        else:
            raise FormatError(
                f"{self.path}: tensor {key!r} is neither a {cfg.peft_type} factor nor listed in "
                "modules_to_save; the weights do not match adapter_config.json"
            )

    def _check_module(self, mod: AdapterModule) -> None:
        cfg, infos, keys = self.config, self.raw.infos(), mod.keys
        where = f"{self.path}: module {mod.path!r}"
        if cfg.peft_type == "LORA":
            pair = ("emb_A", "emb_B") if "emb_A" in keys or "emb_B" in keys else ("A", "B")
            if not all(p in keys for p in pair):
                raise FormatError(f"{where} has only one of the LoRA factors {pair}")
            rank = infos[keys[pair[0]]].shape[0]
            if rank != cfg.rank_of(mod.path):
                raise FormatError(
                    f"{where} has rank {rank} but the config gives r={cfg.rank_of(mod.path)} "
                    "(check r and rank_pattern)"
                )
            if ("magnitude" in keys) != cfg.use_dora:
                raise FormatError(
                    f"{where}: use_dora is {cfg.use_dora} but lora_magnitude_vector is "
                    f"{'present' if 'magnitude' in keys else 'missing'}"
                )
            if "B_bias" in keys and not cfg.lora_bias:
                raise FormatError(f"{where} has lora_B.bias but lora_bias is false in the config")
            mod.rank = rank
        elif cfg.peft_type == "LOKR":
            for w in ("w1", "w2"):
                if w not in keys and not (f"{w}_a" in keys and f"{w}_b" in keys):
                    raise FormatError(f"{where} lacks lokr_{w} (or lokr_{w}_a and lokr_{w}_b)")
            mod.rank = cfg.rank_of(mod.path)
        elif cfg.peft_type == "LOHA":
            missing = [k for k in ("w1_a", "w1_b", "w2_a", "w2_b") if k not in keys]
            if missing:
                raise FormatError(f"{where} lacks hada_{missing[0]}")
            mod.rank = cfg.rank_of(mod.path)
        mod.scale = cfg.scaling(mod.path)

    # ----------------------------------------------------------------------- queries

    @property
    def peft_type(self) -> str:
        return self.config.peft_type

    def infos(self) -> dict[str, TensorInfo]:
        return self.raw.infos()

    def files(self) -> list[Path]:
        return [self.path / CONFIG_FILE, *self.raw.files()]

    def get_raw(self, key: str) -> torch.Tensor:
        return self.raw.get(key)

    get = get_raw  # replacement tensors are read like any checkpoint tensor

    @property
    def owns_tensors(self) -> bool:
        return self.raw.owns_tensors

    def _factor(self, mod: AdapterModule, name: str) -> torch.Tensor:
        return self.raw.get(mod.keys[name]).float()

    def needs_base(self, mod: AdapterModule) -> bool:
        """DoRA and IA3 deltas depend on the base weight."""
        return self.config.use_dora or self.config.peft_type == "IA3"

    def targets(self) -> dict[str, tuple[AdapterModule, str]]:
        """Base tensor name -> (module, 'weight' | 'bias') for every base tensor this adapter changes.

        IA3 bias entries (non-feedforward modules scale the bias too) apply only where the base
        has a bias; the engine drops them otherwise.
        """
        if self._targets is not None:
            return self._targets
        out: dict[str, tuple[AdapterModule, str]] = {}
        for mod in self.modules.values():
            out[mod.weight_name] = (mod, "weight")
            if "B_bias" in mod.keys:
                out[mod.bias_name] = (mod, "bias")
            if self.peft_type == "IA3" and not self.config.is_feedforward(mod.path):
                out[mod.bias_name] = (mod, "bias")
        self._targets = out
        return out

    def is_low_rank(self, mod: AdapterModule) -> bool:
        """Plain LoRA (no DoRA): the delta is exactly scale * B @ A."""
        return self.peft_type == "LORA" and not self.config.use_dora

    def lora_factors(self, mod: AdapterModule, base_shape: tuple[int, ...] | None = None) -> LoraFactors:
        if mod.layer_type == "embedding":
            A, B = self._factor(mod, "emb_A"), self._factor(mod, "emb_B")
            shape = base_shape or (A.shape[1], B.shape[0])
            return LoraFactors(A, B, mod.scale, True, tuple(shape))
        A, B = self._factor(mod, "A"), self._factor(mod, "B")
        out = B.shape[0]
        if A.dim() > 2:  # conv: A (r, in, k...), B (out, r, 1...)
            shape = base_shape or (out, *A.shape[1:])
            return LoraFactors(A.flatten(1), B.flatten(1), mod.scale, False, tuple(shape))
        if self.config.fan_in_fan_out:
            return LoraFactors(A, B, mod.scale, True, tuple(base_shape or (A.shape[1], out)))
        return LoraFactors(A, B, mod.scale, False, tuple(base_shape or (out, A.shape[1])))

    def delta(self, target: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """The exact dense delta this adapter adds to base tensor ``target`` (float32)."""
        entry = self.targets().get(target)
        if entry is None:
            raise FormatError(f"{self.path}: the adapter does not change {target!r}")
        mod, role = entry
        if self.needs_base(mod) and base is None:
            raise FormatError(
                f"{self.path}: the {self._kind_name()} delta of {target!r} depends on the base weight; "
                "give a base_model"
            )
        basef = base.float() if base is not None else None
        kind = self.peft_type
        if role == "bias":
            if kind == "IA3":
                return self._ia3(mod, basef, bias=True)
            return self._factor(mod, "B_bias") * mod.scale
        if kind == "LORA":
            lora = self.lora_factors(mod, tuple(base.shape) if base is not None else None).dense()
            return self._dora(mod, basef, lora) if self.config.use_dora else lora
        if kind == "IA3":
            return self._ia3(mod, basef, bias=False)
        if kind == "LOKR":
            return self._lokr(mod, basef)
        return self._loha(mod, basef)

    def _kind_name(self) -> str:
        return "DoRA" if self.config.use_dora else self.peft_type

    def _dora(self, mod: AdapterModule, base: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        import torch

        m = self._factor(mod, "magnitude")
        merged = base + lora
        if mod.layer_type == "embedding":  # W (V, d): one magnitude per column
            norm = torch.linalg.vector_norm(merged, dim=0)
            return merged * (m / norm)[None, :] - base
        if self.config.fan_in_fan_out and merged.dim() == 2:  # W (in, out)
            norm = torch.linalg.vector_norm(merged, dim=0)
            return merged * (m / norm)[None, :] - base
        norm = torch.linalg.vector_norm(merged.flatten(1), dim=1)
        factor = (m.flatten() / norm).view(-1, *([1] * (merged.dim() - 1)))
        return factor * merged - base

    def _ia3(self, mod: AdapterModule, base: torch.Tensor, bias: bool) -> torch.Tensor:
        l = self._factor(mod, "l")
        ff = self.config.is_feedforward(mod.path)
        if bias:
            return base * (l.flatten() - 1.0)
        if self.config.fan_in_fan_out and base.dim() == 2:
            l = l.T
        elif base.dim() > 2 and not ff:  # conv, output channels: (1, C, 1, 1) -> (C, 1, 1, 1)
            l = l.transpose(0, 1)
        return base * (l - 1.0)

    def _lokr(self, mod: AdapterModule, base: torch.Tensor | None) -> torch.Tensor:
        import torch

        keys = mod.keys
        f = lambda n: self._factor(mod, n)  # noqa: E731
        w1 = f("w1") if "w1" in keys else f("w1_a") @ f("w1_b")
        if "w2" in keys:
            w2 = f("w2")
        elif "t2" in keys:
            w2 = torch.einsum("ijkl,ip,jr->prkl", f("t2"), f("w2_a"), f("w2_b"))
        else:
            w2 = f("w2_a") @ f("w2_b")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2) * mod.scale
        return delta.reshape(base.shape) if base is not None else delta

    def _loha(self, mod: AdapterModule, base: torch.Tensor | None) -> torch.Tensor:
        import torch

        f = lambda n: self._factor(mod, n)  # noqa: E731
        if "t1" in mod.keys:
            w1 = torch.einsum("ijkl,jr,ip->prkl", f("t1"), f("w1_b"), f("w1_a"))
            w2 = torch.einsum("ijkl,jr,ip->prkl", f("t2"), f("w2_b"), f("w2_a"))
        else:
            w1, w2 = f("w1_a") @ f("w1_b"), f("w2_a") @ f("w2_b")
        delta = w1 * w2 * mod.scale
        return delta.reshape(base.shape) if base is not None else delta

    def close(self) -> None:
        self.raw.close()


def is_adapter_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()
