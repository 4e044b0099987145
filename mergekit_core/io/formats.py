"""The built-in checkpoint formats and :func:`open_checkpoint`, which picks one for a path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_core.components import Format
from mergekit_core.errors import FormatError
from mergekit_core.io.peft_reader import AdapterReader, is_adapter_dir
from mergekit_core.io.readers import (
    SAFETENSORS_INDEX,
    TORCH_INDEX,
    TORCH_SUFFIXES,
    SafetensorsReader,
    TorchReader,
)

if TYPE_CHECKING:  # pragma: no cover
    from mergekit_core.plugins import PluginHost


class PeftAdapterFormat(Format):
    name = "peft_adapter"
    description = "PEFT adapter directory (LoRA, rsLoRA, DoRA, IA3, LoKr, LoHa): adapter_config.json + weights."
    priority = 20

    def sniff(self, path: Path) -> bool:
        return is_adapter_dir(path)

    def open(self, path: Path) -> AdapterReader:
        return AdapterReader(path)


class HFSafetensorsFormat(Format):
    name = "hf_safetensors"
    description = "Model directory with model.safetensors, or shards and model.safetensors.index.json."
    priority = 10

    def sniff(self, path: Path) -> bool:
        return path.is_dir() and (
            (path / SAFETENSORS_INDEX).is_file()
            or any(p.name != "adapter_model.safetensors" for p in path.glob("*.safetensors"))
        )

    def open(self, path: Path) -> SafetensorsReader:
        return SafetensorsReader.from_directory(path)


class SafetensorsFileFormat(Format):
    name = "safetensors"
    description = "A single .safetensors file."
    priority = 10

    def sniff(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    def open(self, path: Path) -> SafetensorsReader:
        return SafetensorsReader.from_file(path)


class TorchStateDictFormat(Format):
    name = "torch"
    description = "PyTorch .bin/.pt state dicts (file, directory or sharded), loaded with weights_only=True."
    priority = 5

    def sniff(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix in TORCH_SUFFIXES
        return path.is_dir() and (
            (path / TORCH_INDEX).is_file() or (path / "pytorch_model.bin").is_file()
        )

    def open(self, path: Path) -> TorchReader:
        return TorchReader.from_directory(path) if path.is_dir() else TorchReader(path, [path])


FORMATS = [PeftAdapterFormat(), HFSafetensorsFormat(), SafetensorsFileFormat(), TorchStateDictFormat()]


def open_checkpoint(path: Path | str, host: PluginHost) -> Any:
    """Open ``path`` with the highest-priority format that recognises it (headers only)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    formats = sorted(host.components("format"), key=lambda f: -f.priority)
    for fmt in formats:
        if fmt.can_read and fmt.sniff(path):
            reader = fmt.open(path)
            reader.format_name = fmt.name
            return reader
    what = "directory" if path.is_dir() else "file"
    raise FormatError(
        f"{path}: {what} is in no known format; expected a model directory (model.safetensors, "
        "shards with model.safetensors.index.json, pytorch_model.bin), a PEFT adapter directory "
        "(adapter_config.json), or a .safetensors/.bin/.pt file",
        hint="'mk plugins list' shows the installed formats",
    )
