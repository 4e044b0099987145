"""The backbone (a small residual MLP with LayerNorm) and the frozen per-task heads."""

from __future__ import annotations

import torch
from torch import nn

WIDTH, HIDDEN, FEATURES, BLOCKS = 128, 256, 64, 2
LOGIT_SCALE = 20.0


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Backbone(nn.Module):
    """64 pixels -> 64 features: Linear, pre-LN residual blocks, LayerNorm, Linear (~149k params)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH, HIDDEN) for _ in range(BLOCKS)])
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.proj(self.norm(h))


def head_logits(features: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Frozen 'zero-shot' head: ``scale * cos(feature, prototype_c)`` for every class ``c``.

    ``features``: (n, 64) float32, used as they are (not centred: a frozen centre would be one more
    thing the other tasks' vectors move the features away from). Returns (n, classes) logits.
    The recipe of shared/reference/digits-benchmark-notes.md, the role CLIP's text heads play.
    """
    return head["scale"] * nn.functional.normalize(features, dim=-1) @ head["prototypes"].T


def make_head(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """The head of one task from the pretrained backbone's features of its training images.

    ``prototypes``: (classes, 64), each class's mean feature minus the mean of the class means,
    unit length. Only the prototypes are centred; :func:`head_logits` never centres the features.
    """
    means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
    protos = means - means.mean(0)
    return {"prototypes": nn.functional.normalize(protos, dim=-1), "scale": torch.tensor(LOGIT_SCALE)}


def backbone_from_state(state: dict[str, torch.Tensor]) -> Backbone:
    model = Backbone()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
