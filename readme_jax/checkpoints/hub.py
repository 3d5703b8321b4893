"""A Hugging Face hub id (``org/name``) as a checkpoint source: downloaded to the local hub cache.

``model=org/name`` that is not an existing local path is read as a hub id; :func:`hub_snapshot`
fetches only what :func:`readme_jax.checkpoints.load_hf` and ``tokenizer_from_hf`` read
(:data:`ALLOW_PATTERNS`) with ``huggingface_hub.snapshot_download`` and returns the snapshot
directory. Offline (``HF_HUB_OFFLINE=1``, or no connection) a cached snapshot is used when there is
one; otherwise a CheckpointError names the id and says how to pass a local directory instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from readme_jax.errors import CheckpointError

# owner/name as the hub spells them: letters, digits, '-', '_', '.'; no leading '.', no '..' or '--'
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def is_hub_id(source) -> bool:
    """``org/name`` that is not a local path (a local file or directory always wins)."""
    s = str(source)
    return (HUB_ID.fullmatch(s) is not None and ".." not in s and "--" not in s
            and not s.endswith(".gguf") and not Path(s).exists())


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _use_local(repo_id: str) -> str:
    return (f"pass a local directory instead: model=/path/to/dir holding config.json, *.safetensors and "
            f"tokenizer.json (for example made on a machine with a network by `hf download {repo_id} "
            "--local-dir DIR`), or a .gguf file")


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of hub repo ``repo_id`` (downloaded if needed and possible)."""
    try:
        import huggingface_hub  # local import: optional dependency, needed only for hub ids
        from huggingface_hub import errors as hub_errors  # local import: as above
    except ImportError:
        raise CheckpointError(f"model {repo_id!r} is not a local path, so it was read as a Hugging Face hub id, "
                              "but huggingface_hub is not installed (pip install huggingface_hub); or "
                              + _use_local(repo_id)) from None
    offline = _offline_env()
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as e:
        why = "HF_HUB_OFFLINE is set" if offline else f"no connection to the hub ({type(e).__name__})"
        raise CheckpointError(f"model {repo_id!r} is not a local path, so it was read as a Hugging Face hub id, "
                              f"but no network was available ({why}) and the hub cache holds no copy of it; "
                              + _use_local(repo_id)) from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError) as e:
        raise CheckpointError(f"model {repo_id!r}: the Hugging Face hub has no such repository, or it needs a login "
                              f"or access approval ({type(e).__name__}); check the id, or "
                              + _use_local(repo_id)) from None
    except hub_errors.HfHubHTTPError as e:
        raise CheckpointError(f"model {repo_id!r}: downloading from the Hugging Face hub failed ({e}); "
                              + _use_local(repo_id)) from None
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"model {repo_id!r}: the hub snapshot at {p} has no config.json; only repositories "
                              "with an HF Llama (config.json + *.safetensors + tokenizer.json) load by id. For a "
                              "GGUF-only repository download the .gguf and pass its path")
    return p


def resolve_source(source) -> Path:
    """``source`` as a local path: a hub id becomes its snapshot directory, anything else stays as given."""
    return hub_snapshot(str(source)) if is_hub_id(source) else Path(source)
