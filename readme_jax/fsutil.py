"""Writing folders safely: atomic folder writes, removal that never follows a link, a check that no
link inside an output folder leads out of it, and an exclusive lock on an output folder.

Why by hand: the standard library has the pieces (``os.replace``, ``fcntl.flock``) but no
"write this folder whole or not at all" helper; orbax's own atomicity covers one checkpoint, not the
folder around it (meta.json, tokenizer files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from readme_jax.errors import ConfigError


def remove_tree(path: Path) -> None:
    """Delete a folder (or file); a symbolic link is unlinked, never followed."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling temp folder to fill; on success it replaces ``target`` in one rename.

    On any exception the temp folder is removed and ``target`` is left as it was. With
    ``overwrite=False`` an existing ``target`` is an error (raised before anything is written).
    """
    target = Path(target).absolute()
    if target.is_symlink():
        raise ConfigError(f"{target} is a symbolic link; refusing to write through it")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; pass overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    remove_tree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        moved = target.exists()
        if moved:
            remove_tree(old)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if moved:
                os.replace(old, target)
            raise
        if moved:
            remove_tree(old)
    finally:
        remove_tree(tmp)


def escaping_links(root: Path) -> list[tuple[Path, Path]]:
    """``(link, resolved target)`` for every symbolic link under ``root`` whose target lies outside it
    (or dangles). The walk never follows a link."""
    root = Path(root).resolve()
    bad = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                dest = p.resolve()
                if not dest.exists() or not dest.is_relative_to(root):
                    bad.append((p, dest))
    return bad


def check_no_escaping_links(root: Path) -> None:
    """ConfigError naming the first link under ``root`` that leads out of it: nothing the project
    writes or deletes inside an output folder may land outside it."""
    bad = escaping_links(root)
    if bad:
        link, dest = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"{link} is a symbolic link to {dest}, outside {Path(root).resolve()}{more}; "
                          "refusing to write or delete through it (remove the link)")


class DirLock:
    """An exclusive, advisory lock on a folder (``<dir>/.lock``, flock): a second holder is refused
    with the first one's pid, host, start time and command. The OS drops it when the process dies."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        if self.path.is_symlink():
            raise ConfigError(f"{self.path} is a symbolic link; refusing to use it as a lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another readme-jax run ({self.holder()}); "
                              "wait for it to finish or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "holder unknown"
        return f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: {h.get('command')}"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
