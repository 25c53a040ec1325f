"""Resolving a model reference: a local path, the bundled default model, or a hub file.

- ``None`` -> the bundled default model (tiny-r1, shipped inside the package);
- an existing path -> that file;
- ``owner/repo:file.gguf`` -> downloaded once with huggingface-hub (progress bar, resumable,
  cached in the usual Hugging Face cache, reused offline afterwards).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edge.errors import ModelNotFoundError

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_FILE = "tiny-r1-q8_0.gguf"
# what the bundled model can do: it knows its training task and nothing else
DEFAULT_MODEL_HINT = (
    "tiny-r1 is a 1.65M-parameter demo model that only knows chained arithmetic, e.g. "
    "'a = 12. b = a + 7. c = b - 5. What is c?'; pass --model for a real one"
)
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^:]+\.(gguf|onnx))$")


def default_model() -> Path:
    path = BUNDLED_DIR / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelNotFoundError(
            "no bundled default model in this install; pass one with --model PATH.gguf "
            "or --model owner/repo:file.gguf (a Hugging Face repo file)"
        )
    return path


def resolve_model(ref: str | os.PathLike | None) -> Path:
    """Return a local path for ``ref`` (downloading a hub file if needed)."""
    if ref is None or str(ref) == "":
        return default_model()
    ref = str(ref)
    p = Path(ref).expanduser()
    if p.exists():
        return p
    m = HUB_REF.match(ref)
    if m:
        return _download(m["repo"], m["file"])
    raise ModelNotFoundError(f"model not found: {ref} (give a .gguf path, an ONNX folder, or owner/repo:file.gguf)")


def _download(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise ModelNotFoundError(
            f"{repo_id}:{filename} is not in the local cache and the hub cannot be reached; "
            "download it on a connected machine or pass a local path"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise ModelNotFoundError(f"{repo_id}:{filename} is not on the hub ({type(exc).__name__})") from None
    except OSError as exc:
        raise ModelNotFoundError(f"could not download {repo_id}:{filename}: {exc}") from None
