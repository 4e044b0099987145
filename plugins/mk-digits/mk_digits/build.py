"""Build the pool: pretrain a backbone, make frozen heads, fine-tune once per task, save everything.

Layout of the pool directory::

    pool.json                   benchmark version, settings, accuracies (zero-shot, fine-tuned, adapter)
    base/                       the pretrained backbone (model.safetensors + config.json)
    <task>/                     the backbone fine-tuned on that task (full checkpoint)
    lora/<task>/                the same fine-tune as a PEFT LoRA adapter (truncated SVD of the delta)
    heads/<task>.safetensors    the task's frozen head; never merged

The recipe follows shared/reference/digits-benchmark-notes.md: narrow pretraining (digits 0-4,
upright) so that far tasks interfere, frozen class-prototype heads (as CLIP's text heads), and a
small fine-tuning learning rate so that task vectors are about 0.1 of the weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergekit_core.api import AtomicDirectory
from mk_digits.data import SHIFT, TASKS, num_classes, task_data
from mk_digits.model import Backbone, head_logits, make_head

MODEL_CONFIG = {"model_type": "mk-digits-mlp", "architectures": ["Backbone"], "in_features": 64}
BENCHMARK_VERSION = 2
"""Recorded in pool.json; a pool of another version is rebuilt by :func:`build_pool` and refused by
the evaluator. 1: heads centred the features on a frozen mean feature; `shifted` moved images along
both axes. 2: only the prototypes are centred (the notes' recipe); `shifted` moves images along one
axis (benchmarks/shifted_task.py)."""
BUILD_THREADS = 1
"""torch threads while building: these models are too small for intra-op threads to pay off
(benchmarks/build_time.py on a loaded 2-core machine: 35-42 s with one thread, 539 s with torch's
default of two)."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class BuildSettings:
    seed: int = 0
    data_seed: int = 0
    pretrain_steps: int = 1500
    finetune_steps: int = 500
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    finetune_lr: float = 3e-4
    lora_rank: int = 32

    @classmethod
    def quick(cls, seed: int = 0) -> BuildSettings:
        """A smaller build for tests: same recipe, fewer steps."""
        return cls(seed=seed, pretrain_steps=400, finetune_steps=150)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    img = x.view(-1, 8, 8)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = torch.rand(img.shape, generator=g) >= 0.25
    noise = torch.randn(img.shape, generator=g) * 0.05
    return (img * keep + noise).reshape(-1, 64)


def _batches(n: int, batch: int, g: torch.Generator):
    while True:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) == batch:
                yield idx


def pretrain(settings: BuildSettings) -> Backbone:
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    data = task_data("upright", "train", settings.data_seed)
    keep = data.y < 5
    x, y = torch.from_numpy(data.x[keep]), torch.from_numpy(data.y[keep])
    model, head = Backbone(), nn.Linear(64, 5)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=settings.pretrain_lr)
    batches = _batches(len(y), settings.batch_size, g)
    for _ in range(settings.pretrain_steps):
        idx = next(batches)
        loss = nn.functional.cross_entropy(head(model(_augment(x[idx], g))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def heads_for(model: Backbone, settings: BuildSettings) -> dict[str, dict[str, torch.Tensor]]:
    heads = {}
    with torch.no_grad():
        for task in TASKS:
            data = task_data(task, "train", settings.data_seed)
            heads[task] = make_head(model(torch.from_numpy(data.x)), torch.from_numpy(data.y), num_classes(task))
    return heads


def finetune(base: Backbone, task: str, head: dict[str, torch.Tensor], settings: BuildSettings) -> Backbone:
    """The backbone fine-tuned on ``task``'s training split against its frozen head."""
    data = task_data(task, "train", settings.data_seed)
    return finetune_on(base, torch.from_numpy(data.x), torch.from_numpy(data.y), head, settings,
                       seed=settings.seed * 100 + TASKS.index(task))


def finetune_on(base: Backbone, x: torch.Tensor, y: torch.Tensor, head: dict[str, torch.Tensor],
                settings: BuildSettings, seed: int) -> Backbone:
    """AdamW (``settings.finetune_lr``, ``finetune_steps`` steps of ``batch_size``) on inputs ``x``
    (n, 64) float32 and labels ``y`` (n,) int64, every backbone weight trained, the head frozen."""
    g = torch.Generator().manual_seed(seed)
    model = Backbone()
    model.load_state_dict(base.state_dict())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr)
    batches = _batches(len(y), settings.batch_size, g)
    for _ in range(settings.finetune_steps):
        idx = next(batches)
        loss = nn.functional.cross_entropy(head_logits(model(x[idx]), head), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(state: dict[str, torch.Tensor], task: str, head: dict[str, torch.Tensor], split: str,
             data_seed: int) -> float:
    from mk_digits.model import backbone_from_state

    data = task_data(task, split, data_seed)
    with torch.no_grad():
        logits = head_logits(backbone_from_state(state)(torch.from_numpy(data.x)), head)
    return float((logits.argmax(-1).numpy() == data.y).mean())


def lora_from_delta(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A LoRA adapter (scaling 1) approximating the fine-tune's 2-D weight changes by truncated SVD.

    Biases and LayerNorm changes cannot be expressed as LoRA factors and are left out; the pool
    records the adapter's own accuracy next to the full fine-tune's.
    """
    tensors, modules = {}, []
    for name, w in base.items():
        if w.dim() != 2:
            continue
        module = name.removesuffix(".weight")
        U, S, Vh = torch.linalg.svd((tuned[name] - w).float(), full_matrices=False)
        r = min(rank, S.numel())
        tensors[f"base_model.model.{module}.lora_A.weight"] = Vh[:r].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (U[:, :r] * S[:r]).contiguous()
        modules.append(module)
    return tensors, modules


def _save_model(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2))


def pool_version(meta: dict) -> int:
    """The benchmark version a pool.json records (pools from before versioning are version 1)."""
    return int(meta.get("benchmark_version", 1))


def build_pool(out: Path, settings: BuildSettings | None = None,
               log: Callable[[str], None] = lambda message: None, threads: int | None = BUILD_THREADS) -> dict:
    """Build (or reuse, when pool.json matches the settings and the benchmark version) the pool in
    ``out``; returns pool.json. A pool of other settings or of another version is rebuilt in place.
    ``threads``: torch intra-op threads while building (None: torch's default)."""
    settings = settings or BuildSettings()
    out = Path(out)
    meta_path = out / "pool.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if pool_version(meta) != BENCHMARK_VERSION:
            log(f"{out}: built by benchmark version {pool_version(meta)}, rebuilding it for version {BENCHMARK_VERSION}")
        elif meta.get("settings") == asdict(settings):
            return meta
    # a pool of other settings (pool.json) is rebuilt in its place; any other folder is refused
    with AtomicDirectory(out, force=meta_path.is_file(), kind="digits_pool", what="pool directory") as tmp, \
            torch_threads(threads or torch.get_num_threads()):
        _build_into(tmp, settings, log)
    return json.loads(meta_path.read_text())


def _build_into(tmp: Path, settings: BuildSettings, log: Callable[[str], None]) -> None:
    started = time.time()
    torch.manual_seed(settings.seed)
    base = pretrain(settings)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    log(f"pretrained the backbone in {time.time() - started:.1f} s")
    heads = heads_for(base, settings)
    _save_model(tmp / "base", base_state)
    (tmp / "heads").mkdir(parents=True)
    meta = {"benchmark_version": BENCHMARK_VERSION, "settings": asdict(settings), "shift_rule": SHIFT,
            "tasks": {}, "model_config": MODEL_CONFIG}
    for task in TASKS:
        save_file(heads[task], str(tmp / "heads" / f"{task}.safetensors"))
        tuned = {k: v.detach().clone() for k, v in finetune(base, task, heads[task], settings).state_dict().items()}
        _save_model(tmp / task, tuned)
        lora, modules = lora_from_delta(base_state, tuned, settings.lora_rank)
        adapter = tmp / "lora" / task
        adapter.mkdir(parents=True)
        save_file(lora, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": settings.lora_rank, "lora_alpha": settings.lora_rank,
            "target_modules": modules, "base_model_name_or_path": "base"}, indent=2))
        adapted = dict(base_state)
        for module in modules:
            key = f"base_model.model.{module}"
            adapted[f"{module}.weight"] = base_state[f"{module}.weight"] + lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
        delta_norm = float(sum(((tuned[k] - base_state[k]) ** 2).sum() for k in base_state) ** 0.5)
        base_norm = float(sum((v ** 2).sum() for v in base_state.values()) ** 0.5)
        meta["tasks"][task] = {
            "classes": num_classes(task),
            "zero_shot_test_accuracy": accuracy(base_state, task, heads[task], "test", settings.data_seed),
            "finetuned_test_accuracy": accuracy(tuned, task, heads[task], "test", settings.data_seed),
            "lora_test_accuracy": accuracy(adapted, task, heads[task], "test", settings.data_seed),
            "task_vector_relative_norm": delta_norm / base_norm,
        }
        log(f"{task}: zero-shot {meta['tasks'][task]['zero_shot_test_accuracy']:.3f}, "
            f"fine-tuned {meta['tasks'][task]['finetuned_test_accuracy']:.3f}, "
            f"LoRA r={settings.lora_rank} {meta['tasks'][task]['lora_test_accuracy']:.3f}")
    meta["build_seconds"] = round(time.time() - started, 1)
    (tmp / "pool.json").write_text(json.dumps(meta, indent=2))


def load_heads(pool: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {t: load_file(str(Path(pool) / "heads" / f"{t}.safetensors")) for t in TASKS}


