"""Hugging Face Hub model IDs wherever a path is accepted: ``org/name`` or ``org/name@revision``.

Only the files a merge reads are fetched (weights, their index, config, tokenizer and adapter
files), into the standard Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``), offline when
``HF_HUB_OFFLINE=1``, with the token from the usual places (``HF_TOKEN``, ``hf auth login``).
``huggingface_hub`` is an optional extra: ``pip install "mergekit-core[hub]"``. A local path
always wins over an ID of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

from mergekit_core.errors import UsageError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
LEGACY_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
SIDE_FILES = (
    "config.json", "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
    "chat_template.jinja", "preprocessor_config.json",
)


def is_repo_id(text: object) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing local path."""
    return isinstance(text, str) and bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def command_line_path(text: str | None) -> str | None:
    """A path from the command line made absolute (relative to the working directory), or a Hub
    model ID left as written."""
    if not text:
        return None
    return text if is_repo_id(text) else str(Path(text).expanduser().absolute())


def resolve_hub_model(model_id: str) -> Path:
    """The local folder (in the Hugging Face cache) holding ``model_id``'s merge files.

    Raises:
        UsageError: ``huggingface_hub`` is not installed; the repo or revision does not exist or
            needs a token; offline with the files not cached; any other download failure.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise UsageError(f"{model_id}: a Hugging Face Hub model ID, and huggingface_hub is not installed",
                         hint='pip install "mergekit-core[hub]", or give a local path') from None
    repo_id, _, revision = model_id.partition("@")
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[*WEIGHT_PATTERNS, *SIDE_FILES]))
        if not any(folder.glob("*.safetensors")):  # an older checkpoint: its .bin weights instead
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, revision=revision or None, allow_patterns=[*LEGACY_PATTERNS, *SIDE_FILES]))
    except hub_errors.GatedRepoError:
        raise UsageError(f"{model_id}: a gated model; accept its terms on the Hub and give a token",
                         hint="set HF_TOKEN, or run 'hf auth login'") from None
    except hub_errors.RepositoryNotFoundError:
        raise UsageError(f"{model_id}: no such model on the Hub (or it is private)",
                         hint="check the ID; for a private model set HF_TOKEN or run 'hf auth login'") from None
    except hub_errors.RevisionNotFoundError:
        raise UsageError(f"{model_id}: the model has no revision {revision!r}",
                         hint="give a branch, tag or commit of the model") from None
    except hub_errors.LocalEntryNotFoundError:
        raise UsageError(f"{model_id}: not in the Hugging Face cache, and the Hub cannot be reached "
                         "(offline, or HF_HUB_OFFLINE=1)",
                         hint="download it once while online, or give a local path") from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(f"{model_id}: cannot fetch it from the Hub ({type(exc).__name__}: {exc})",
                         hint="check the network and the ID, or give a local path") from None
    return folder
