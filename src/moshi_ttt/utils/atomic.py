"""Writes that leave either the old file (or directory) or the complete new one.

Each write goes to a temporary sibling that is renamed over the target only
once it is complete, so a crash mid-save never leaves a half-written checkpoint.
"""

import contextlib
import os
import shutil
import typing as tp
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> tp.Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> tp.Iterator[Path]:
    """Yield a temporary directory to fill; it replaces the directory `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(complete: Path, path: Path) -> None:
    """Put the complete directory `complete` at `path`, moving aside (then removing) what was there."""
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(complete, path)
    except BaseException:
        if old.exists():  # the new one could not go in: the old one goes back
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
