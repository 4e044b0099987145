"""Test helpers for mergekit-core and for plugin authors.

- :func:`fresh_host`: a plugin host with the built-ins and the plugin modules you name.
- :func:`run_mk`: run ``mk`` in process, capturing exit status, stdout and stderr.
- :func:`write_fine_tunes`: a small base model and fine-tunes of it, as safetensors folders.
- :func:`check_merge_method`: the contract every merge method must meet, in one call::

      def test_contract():
          check_merge_method(MyMethod())
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_core.components import MergeMethod, PrepareContext, TensorGroup
from mergekit_core.plugins import PluginHost


def fresh_host(plugins: Mapping[str, object] | None = None, *, entry_points: bool = False,
               environ: Mapping[str, str] | None = None) -> PluginHost:
    """A new host: built-ins, plus ``plugins`` (name -> module), plus entry points if asked."""
    host = PluginHost(load_entry_points=entry_points, environ=environ or {})
    for name, module in (plugins or {}).items():
        host.register(module, name, distribution=name)
    return host


def write_fine_tunes(root: Any, shapes: Mapping[str, Sequence[int]], names: Sequence[str] = ("base", "ft1", "ft2"),
                     *, scale: float = 0.1, seed: int = 0, dtype: Any = None,
                     config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``root/<name>/model.safetensors`` for each of ``names``: the first is a random base
    (``shapes``: tensor name -> shape, standard normal), the others the base plus ``scale`` times
    fresh noise; stored in ``dtype`` (default bfloat16), with ``config.json`` when given.
    Returns name -> folder (``pathlib.Path``)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(tuple(s), generator=g) for n, s in shapes.items()}
    folders = {}
    for i, name in enumerate(names):
        folder = Path(root) / name
        folder.mkdir(parents=True)
        tensors = {n: (x if i == 0 else x + scale * torch.randn(x.shape, generator=g)).to(dtype or torch.bfloat16)
                   for n, x in base.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        if config is not None:
            (folder / "config.json").write_text(json.dumps(dict(config)))
        folders[name] = folder
    return folders


@dataclass
class MkResult:
    exit_code: int
    stdout: str
    stderr: str


def run_mk(args: Sequence[str], host: PluginHost | None = None,
           env: Mapping[str, str] | None = None) -> MkResult:
    """Run ``mk ARGS`` in this process; never raises SystemExit."""
    from mergekit_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args), host=host if host is not None else fresh_host())
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return MkResult(code, out.getvalue(), err.getvalue())


class StaticPrepareContext(PrepareContext):
    """A prepare context over fixed groups, for testing methods that need a global pass."""

    def __init__(self, groups: Sequence[TensorGroup], plan: Any = None) -> None:
        self._groups = list(groups)
        self.plan = plan

    def groups(self) -> Iterator[TensorGroup]:
        return iter(self._groups)


def _group(num_sources: int, shape: tuple[int, ...], seed: int, coefficient: float = 0.5) -> TensorGroup:
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [torch.randn(shape, generator=g) * 0.1 for _ in range(num_sources)]
    return TensorGroup(
        name="model.layers.0.mlp.up_proj.weight", layer=0, base=base, tensors=tensors,
        coefficients=[coefficient] * num_sources, source_names=[f"s{i}" for i in range(num_sources)],
    )


def check_merge_method(method: MergeMethod, params: Mapping[str, Any] | None = None, *,
                       follows_coefficients: bool | None = None) -> None:
    """Assert the merge-method contract on small random tensors.

    Declares a name, a description and sane source bounds; resolves its parameters; returns a
    tensor of the input shape and float dtype; leaves its inputs untouched; is deterministic;
    when it declares itself linear, equals ``sum(c_t * x_t)`` for its coefficients; and, when
    ``follows_coefficients`` (the default for ``delta``-space methods), its result changes when
    one source's ``group.coefficients`` entry (its lambda) changes: a method that ignores them
    silently ignores every lambda policy. Pass ``follows_coefficients=False`` for a method that
    ignores lambda by definition (a plain mean).
    """
    import torch

    if follows_coefficients is None:
        follows_coefficients = method.space == "delta"

    assert method.name and method.description, "a method needs a name and a description"
    assert method.space in ("delta", "weights"), f"space must be delta or weights, not {method.space!r}"
    assert method.min_sources >= 1
    assert method.max_sources is None or method.max_sources >= method.min_sources
    resolved = method.resolve_params(params)
    n = method.min_sources if method.max_sources == method.min_sources else max(2, method.min_sources)
    if method.max_sources is not None:
        n = min(n, method.max_sources)
    for shape in ((6, 5), (7,)):
        group = _group(n, shape, seed=0)
        before = [t.clone() for t in group.tensors]
        state = method.prepare(StaticPrepareContext([_group(n, shape, seed=0)]), resolved) \
            if method.needs_prepare else None
        out = method.merge(group, resolved, state)
        assert isinstance(out, torch.Tensor), f"{method.name}: merge must return a tensor"
        assert tuple(out.shape) == shape, f"{method.name}: merged shape {tuple(out.shape)} != {shape}"
        assert out.is_floating_point(), f"{method.name}: merged tensor must be floating point"
        assert torch.isfinite(out).all(), f"{method.name}: merged tensor has NaN or Inf"
        for a, b in zip(before, group.tensors):
            assert torch.equal(a, b), f"{method.name}: merge changed its input tensors"
        again = method.merge(_group(n, shape, seed=0), resolved, state)
        assert torch.equal(out, again), f"{method.name}: merge is not deterministic"
        if method.linear:
            fresh = _group(n, shape, seed=0)
            coefficients = method.linear_coefficients(fresh, resolved)
            assert len(coefficients) == n, (
                f"{method.name}: linear_coefficients gave {len(coefficients)} values for {n} sources")
            expected = sum(c * t for c, t in zip(coefficients, fresh.tensors))
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=lambda m: (
                f"{method.name}: declares linear = True, but merge() is not sum(c_t * x_t) with its "
                f"linear_coefficients: {m}"))
        if follows_coefficients:
            changed = _group(n, shape, seed=0)
            changed.coefficients[0] *= 2.0
            assert not torch.equal(method.merge(changed, resolved, state), out), (
                f"{method.name}: merge ignores group.coefficients (the lambda of each source); use them, "
                "or pass follows_coefficients=False if the method ignores lambda by definition")
