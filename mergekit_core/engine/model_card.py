"""The model card (``README.md``) written into every merged model or adapter directory, in the
Hugging Face Hub's format: YAML front matter (``base_model``, ``library_name``, ``tags``), then
what was merged, how, and the config that reproduces it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from mergekit_core.config import MergeSpec
from mergekit_core.io.writer import sha256_file
from mergekit_core.version import __version__

CARD = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(path: Path | None) -> str | None:
    """The Hub repo id a local model directory was downloaded or saved from, when its
    ``config.json`` (``_name_or_path``) or ``adapter_config.json`` (``base_model_name_or_path``)
    names one; None for local-only models (the Hub's ``base_model`` must be a repo id)."""
    if path is None or not Path(path).is_dir():
        return None
    for name, key in (("config.json", "_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((Path(path) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and _REPO_ID.match(value) and not Path(value).exists():
            return value
    return None


def write_model_card(directory: Path, title: str, spec: MergeSpec, method: str, params: dict[str, Any],
                     lambda_values: dict[str, float], output_kind: str) -> dict[str, str]:
    """Write ``README.md`` into ``directory`` (``title``: the output's own name); returns
    ``{"README.md": sha256}``."""
    meta: dict[str, Any] = {}
    base = hub_id(spec.base_model)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if output_kind == "adapter" else "transformers"
    meta["tags"] = ["merge", "mergekit-core", method]
    sources = "\n".join(f"- `{s.name}`: {hub_id(s.path) or s.path}" for s in spec.sources)
    base_line = f"`{base or spec.base_model}`" if spec.base_model else "none (a weighted mean of the sources)"
    config = {k: v for k, v in spec.to_config().items() if k not in ("output_dir",)}
    config.get("output", {}).pop("path", None)
    text = (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# {title}\n\n"
        f"A {'LoRA adapter' if output_kind == 'adapter' else 'model'} merged with mergekit-core "
        f"{__version__}, method `{method}`.\n\n"
        f"Base model: {base_line}\n\n## Sources\n\n{sources}\n\n## Method\n\n"
        f"`{method}` with parameters `{json.dumps(params, sort_keys=True, default=str)}`; lambda values "
        f"`{json.dumps(lambda_values, sort_keys=True)}`.\n\n## Reproduce\n\n"
        "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```\n\n"
        "`mk merge CONFIG.yaml --out DIR` with this config (paths as on the machine that merged).\n"
    )
    path = Path(directory) / CARD
    path.write_text(text)
    return {CARD: sha256_file(path)}
