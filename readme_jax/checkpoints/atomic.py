"""Write a folder all at once: into a hidden sibling, then renamed into place.

:func:`write_folder` never leaves a half-written target: the move is
:func:`readme_jax.fsutil.atomic_dir` (files go into a hidden sibling ``.<name>.partial-<pid>`` on the
same file system; with ``overwrite`` the old folder is moved aside and deleted only once the new one
is in place; on any failure the temporary folder is removed and the old target put back).
Refusals (a file in the way, a non-empty folder without ``overwrite``, a
folder that cannot be written) are one-line :class:`CheckpointError` s raised before writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from readme_jax.errors import CheckpointError
from readme_jax.fsutil import atomic_dir


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]


def check_target(out: Path, overwrite: bool, what: str) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``."""
    if out.is_symlink() and not out.exists():
        raise CheckpointError(f"{what} target {out} is a broken symbolic link; expected a folder (new or empty)")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{what} target {out} is a file; expected a folder (new or empty)")
    try:
        n = sum(1 for _ in out.iterdir())
    except OSError as e:
        raise CheckpointError(f"{what} target {out} cannot be read ({_reason(e)})") from None
    if n and not overwrite:
        raise CheckpointError(f"{what} target {out} exists and is not empty ({n} entries); "
                              "pass overwrite=True (CLI: --overwrite) to replace it")


def write_folder(out, write: Callable[[Path], None], *, overwrite: bool = False, what: str = "export") -> Path:
    """Call ``write(tmp_folder)`` and move the result to ``out`` atomically (module doc); returns ``out``.

    The all-or-nothing move is :func:`readme_jax.fsutil.atomic_dir`; this adds the target checks and
    turns file-system failures into one-line CheckpointErrors."""
    out = Path(out).absolute()
    check_target(out, overwrite, what)
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            write(tmp)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{what} to {out} failed ({_reason(e)}); {out} was left as it was") from None
    return out
