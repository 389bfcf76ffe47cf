"""Hugging Face Hub resolution: ``org/name[@revision]`` -> a local snapshot directory.

Every Hub call of the toolkit goes through this module (tests replace or pre-populate the cache).
Honours HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE as huggingface_hub does. Offline,
``snapshot_download`` returns the snapshot folder even when no file matched, so the weight files
are checked here. No code from a repository is ever executed: only weights, JSON and tokenizer
files are fetched.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")

# weights (safetensors preferred; .bin only when no safetensors exist), config and tokenizer files
_CONFIG_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def looks_like_hub_id(ref: str) -> bool:
    return bool(HUB_ID.match(ref)) and not Path(ref).exists()


def split_ref(ref: str) -> tuple[str, str | None]:
    repo, _, revision = ref.partition("@")
    return repo, (revision or None)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or any(
        folder.glob("adapter_model.*")
    )


def resolve(ref: str) -> Path:
    """Download (or find in the cache) the files a merge needs; return the snapshot folder.

    Under ``hub_remote.headers_only()`` / ``hub_remote.only_files()`` (and online), only the config
    files and the files the plan reads are downloaded; the other weight files are represented by
    their headers alone (``hub_remote``)."""
    from huggingface_hub import snapshot_download

    from . import hub_remote

    repo, revision = split_ref(ref)
    with _hub_errors(ref, repo, revision):
        view = hub_remote.view(ref, repo, revision, _CONFIG_PATTERNS)
        if view is not None:
            return view
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_CONFIG_PATTERNS + ["*.safetensors"]))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_CONFIG_PATTERNS + ["*.bin"]))
    if not _has_weights(folder):
        raise UserError(f"hub model '{ref}' has no weight files (*.safetensors, pytorch_model*.bin) in {folder}")
    return folder


@contextmanager
def _hub_errors(ref: str, repo: str, revision: str | None):
    """huggingface_hub's errors as one line each."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.LocalEntryNotFoundError:
        raise UserError(
            f"'{ref}' is not a local path, and as a hub id it is not in the local cache while the Hub "
            "cannot be reached (offline?); check the path or download the model first"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"hub model '{repo}' has no revision '{revision}'") from None
    except hf_errors.GatedRepoError:
        raise UserError(f"hub model '{ref}' is gated: accept its licence on the Hub and log in") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"hub model '{ref}' does not exist or is private (log in with `hf auth login`)") from None
    except hf_errors.HFValidationError as e:
        raise UserError(f"'{ref}' is neither an existing path nor a valid hub id: {e}") from None
    except hf_errors.HfHubHTTPError as e:
        raise UserError(f"hub model '{ref}': the Hub answered {str(e).splitlines()[0][:200]}") from None
