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
    """Frozen 'zero-shot' head: cosine similarity to each class's centred mean pretrained feature."""
    centred = nn.functional.normalize(features - head["center"], dim=-1)
    return head["scale"] * centred @ head["prototypes"].T


def make_head(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    center = features.mean(0)
    protos = torch.stack([features[labels == c].mean(0) for c in range(classes)]) - center
    return {"center": center, "prototypes": nn.functional.normalize(protos, dim=-1),
            "scale": torch.tensor(LOGIT_SCALE)}


def backbone_from_state(state: dict[str, torch.Tensor]) -> Backbone:
    model = Backbone()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
