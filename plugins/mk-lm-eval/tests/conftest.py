from __future__ import annotations

import os
from pathlib import Path

import pytest

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """No network (Hub and datasets lookups fail instead of downloading), and the datasets cache
    of the task files in a temporary folder; everything is restored afterwards."""
    env = {**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf-datasets"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import datasets.config  # read at import: set the values again in case it was imported before

    saved = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_DATASETS_CACHE = Path(env["HF_DATASETS_CACHE"])
    datasets.config.HF_DATASETS_OFFLINE = True
    yield
    datasets.config.HF_DATASETS_CACHE, datasets.config.HF_DATASETS_OFFLINE = saved
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def pool(tmp_path_factory, offline) -> dict[str, Path]:
    """The tiny pool (base, tiny_a, tiny_b, lora_a, the two task YAMLs), built once per session."""
    from mk_lm_eval.tiny import build

    return build(tmp_path_factory.mktemp("lm-eval-tiny"))
