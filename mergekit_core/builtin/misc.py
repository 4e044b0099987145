"""Small built-ins: the identity transform, the `none` optimizer, the `local` executor and the
generic architecture (layer index parsed from common tensor names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mergekit_core.components import (
    Architecture,
    Executor,
    Optimizer,
    OptimizerContext,
    Transform,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Identity(Transform):
    name = "identity"
    description = "Leaves the delta unchanged."

    def apply(self, name: str, delta: torch.Tensor, params: dict[str, Any],
              rng: torch.Generator) -> torch.Tensor:
        return delta


class NoOptimizer(Optimizer):
    name = "none"
    description = "Keeps the lambda policy's values as configured."

    def optimize(self, context: OptimizerContext, params: dict[str, Any]) -> dict[str, float]:
        return dict(context.initial_values)


class LocalExecutor(Executor):
    name = "local"
    description = "Runs sweep trials one after another in this process."

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], params: dict[str, Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)


LAYER_PATTERN = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks|transformer_blocks)\.(\d+)(?:\.|$)"
)
ROLE_PATTERNS = (
    ("embedding", re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)")),
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|head)(\.|$)")),
    ("attention", re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value)")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|fc\d|gate_proj|up_proj|down_proj|dense)")),
    ("norm", re.compile(r"(norm|ln_|\.ln\d?\.|layernorm)")),
)


class GenericArchitecture(Architecture):
    name = "generic"
    description = ("Any transformer-like model: layer index from '.layers.N.', '.h.N.', '.blocks.N.'; "
                   "tied embeddings from config.tie_word_embeddings.")
    priority = -100

    def matches(self, model_config: Mapping[str, Any] | None, tensor_names: Sequence[str]) -> bool:
        return True

    def layer_index(self, tensor_name: str) -> int | None:
        m = LAYER_PATTERN.search(tensor_name)
        return int(m.group(1)) if m else None

    def tied_weights(self, model_config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        if model_config and model_config.get("tie_word_embeddings"):
            return [("lm_head.weight", "model.embed_tokens.weight")]
        return []

    def module_role(self, tensor_name: str) -> str:
        for role, pattern in ROLE_PATTERNS:
            if pattern.search(tensor_name):
                return role
        return "other"


TRANSFORMS = [Identity()]
OPTIMIZERS = [NoOptimizer()]
EXECUTORS = [LocalExecutor()]
ARCHITECTURES = [GenericArchitecture()]
