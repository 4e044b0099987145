"""Every merged model or adapter directory gets a model card the Hub's own parser reads."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host()


def test_model_and_adapter_outputs_carry_a_hub_model_card(tmp_path, models, lora_adapters):
    paths, _ = models
    config = json.loads((paths["base"] / "config.json").read_text())
    (paths["base"] / "config.json").write_text(json.dumps({**config, "_name_or_path": "some-org/tiny-base"}))
    out = tmp_path / "merged"
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(paths["base"]), "--sources",
                     str(paths["ft1"]), str(paths["ft2"]), "--lambda", "0.4", "--out", str(out),
                     "--output-dir", str(tmp_path / "art"), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "some-org/tiny-base" and card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergekit-core", "task_arithmetic"]
    assert "# merged" in card.text and "`ft1`" in card.text and "`ft2`" in card.text
    reproduce = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert reproduce["method"] == {"name": "task_arithmetic", "params": {"lambda": 0.4}}
    meta = json.loads((Path(json.loads(result.stdout)["run_dir"]) / "merge_metadata.json")
                      .read_text())
    assert "README.md" in meta["output"]["sha256"]

    adapters, _ = lora_adapters
    out = tmp_path / "adapter"
    result = run_mk(["merge", "--method", "task_arithmetic", "--adapters", str(adapters["a"]), str(adapters["b"]),
                     "--out", str(out), "--output-dir", str(tmp_path / "art"), "-q"], host=HOST)
    assert result.exit_code == 0, result.stderr
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "mergekit-core" in card.data.tags
    assert card.data.base_model is None  # 'tiny-base' is a local name, not a Hub repo id
