"""Run checkpoints that survive a kill at any instant, and a trainer state that is never code.

A checkpoint (``out/last``, ``out/final``) is a folder; for ``last`` there are three names:

* ``last``: the newest checkpoint, in normal times the only one;
* ``.last.tmp``: the one being written;
* ``last.old``: the one before, kept only between the two renames of a save.

A folder counts as a checkpoint once it holds ``complete.json`` (its step), written after every
other file is on disk (fsynced). ``--resume`` takes the complete folder with the highest step
(``newest_complete``). A save:

1. finishes whatever a killed save left: the newest complete folder becomes ``last``, every
   other folder, complete or not, is deleted;
2. writes ``.last.tmp``, fsyncs it, then writes and fsyncs its ``complete.json``;
3. renames ``last`` to ``last.old``, then ``.last.tmp`` to ``last`` (each rename is atomic);
4. deletes ``last.old``.

The guarantee: a complete folder is deleted only while a newer complete one exists (and ``last``
is renamed into place and flushed before ``last.old`` goes), and deleting starts with its
``complete.json``; so at every instant, whatever file operation a kill interrupts, the newest
complete checkpoint can be found and is whole. ``tests/test_resume.py`` kills a save at each of
its file operations in turn to check it. One writer per run folder at a time.

The trainer state (step, AdamW's moments, random states, TrainConfig) is a ``torch.save`` file
read with ``weights_only=True``: tensors and plain containers only. A run folder may come from
anyone, and a full unpickle would run whatever code its pickle names.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import fsync_path, fsync_tree
from ..errors import UserInputError

MARKER = "complete.json"
STATE_NAME = "trainer_state.pt"
STATE_KEYS = ("step", "optimizer", "data_rng", "torch_rng", "train_config")


def _names(path: Path) -> tuple[Path, Path, Path]:
    """The checkpoint itself, the one being written, the one before."""
    return path, path.with_name(f".{path.name}.tmp"), path.with_name(f"{path.name}.old")


def _step(folder: Path) -> int | None:
    """The step in ``folder``'s complete.json, or None when the folder is not complete."""
    try:
        return int(json.loads((folder / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_complete(path: Path) -> Path | None:
    """The complete checkpoint with the highest step among ``path``'s three names (ties go to
    ``path`` itself), or None."""
    found = [(step, -i, f) for i, f in enumerate(_names(path)) if (step := _step(f)) is not None]
    return max(found)[2] if found else None


def save_atomically(path: Path, step: int, write: Callable[[Path], None]) -> None:
    """Make ``path`` a complete checkpoint of ``step`` whose files ``write(folder)`` writes,
    keeping the guarantee above at every file operation."""
    current, tmp, old = _names(path)
    newest = newest_complete(path)
    for folder in (current, tmp, old):
        if folder != newest:
            _discard(folder)
    if newest not in (None, current):
        os.replace(newest, current)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    with open(tmp / MARKER, "w") as f:
        f.write(json.dumps({"step": step}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    if current.exists():
        os.replace(current, old)
    os.replace(tmp, current)
    fsync_path(current.parent)
    _discard(old)


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder, its complete.json first: a half-deleted one never counts."""
    if not folder.exists():
        return
    (folder / MARKER).unlink(missing_ok=True)
    fsync_path(folder)
    shutil.rmtree(folder)


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """The trainer state into ``folder`` (save_atomically fsyncs it)."""
    with open(folder / STATE_NAME, "wb") as f:
        torch.save(state, f)


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, read as tensors and plain containers only."""
    file = folder / STATE_NAME
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        raise UserInputError(
            f"{file} holds more than tensors and plain containers, so it is not unpickled "
            f"(that could run code): {named[0] if named else 'unsupported pickle content'}"
        ) from None
    except (RuntimeError, EOFError):
        raise UserInputError(f"{file} is not a complete torch.save file") from None
    if not isinstance(state, dict) or not set(STATE_KEYS) <= state.keys():
        raise UserInputError(f"{file} is not a trainer state: it must hold {list(STATE_KEYS)}")
    return state
