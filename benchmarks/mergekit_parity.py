"""How far mk's merge of a translated mergekit config is from mergekit's own, per config.

Builds the tiny Llama pool of tests/test_mergekit_parity.py (a base and three fine-tunes,
float32), merges every config of that test with mergekit (its Python API, CPU) and with
``mk merge`` on the same YAML, and prints, per config, how many tensors are bit-identical and the
largest absolute difference. Needs mergekit (``pip install -e ".[parity]"``, CPU torch first).

    python benchmarks/mergekit_parity.py [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("parity", ROOT / "tests" / "test_mergekit_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mk-parity-") as tmp:
        root = Path(tmp)

        class Factory:  # what pytest's tmp_path_factory gives the fixture
            def mktemp(self, name: str) -> Path:
                (root / name).mkdir()
                return root / name

        pool = parity.pool.__wrapped__(Factory())
        for name, (text, exact) in parity.CONFIGS.items():
            work = root / name
            work.mkdir()
            config = work / "config.yaml"
            config.write_text(textwrap.dedent(text).format(pool=pool))
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(work / "mergekit"),
                      MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
            theirs = {}
            for f in sorted((work / "mergekit").glob("*.safetensors")):
                theirs.update(load_file(f))
            ours = parity.mk_merge(config, work / "mk")
            same = sum(torch.equal(ours[k], theirs[k]) for k in theirs)
            worst = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in theirs)
            rows.append({"config": name, "tensors": len(theirs), "bit_identical": same, "max_abs_diff": worst,
                         "test_requires": "bit for bit" if exact else "within 1e-6"})
            print(f"{name:28s} {same:3d}/{len(theirs)} tensors bit-identical, max |mk - mergekit| = {worst:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
