"""Writes that a crash cannot leave half done: a file is written beside its target and renamed
over it; a folder is staged beside its target and swapped in, so one of the two stays complete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

STAGING_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # the replaced folder, until the new one is in place


def staging_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (``NAME.tmp`` beside it)."""
    return path.with_name(path.name + STAGING_SUFFIX)


def write_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` writes the content to ``path.tmp``, which is then renamed over ``path``
    (e.g. ``write_file(folder / "model.pt", lambda tmp: torch.save(state, tmp))``)."""
    path = Path(path)
    tmp = staging_path(path)
    write(tmp)
    tmp.replace(path)
    return path


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through ``path.tmp`` and a rename."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_json(path: str | Path, payload: Any, *, default: Callable[[Any], Any] = str) -> Path:
    """``payload`` as indented JSON, written atomically; ``default`` converts what JSON lacks."""
    return write_text(path, json.dumps(payload, indent=2, default=default))


def swap_dir(staging: Path, destination: Path) -> Path:
    """Replace ``destination`` by the complete folder ``staging``.

    ``destination`` is first renamed to ``NAME.old`` and removed only after ``staging`` took its
    place, so a crash between the two renames leaves the previous folder whole as ``NAME.old``.
    """
    old = destination.with_name(destination.name + OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    staging.rename(destination)
    shutil.rmtree(old, ignore_errors=True)
    return destination


def write_dir(destination: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(staging)`` fills a fresh folder ``NAME.tmp`` beside ``destination``, which
    :func:`swap_dir` then puts in its place."""
    destination = Path(destination)
    staging = staging_path(destination)
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    return swap_dir(staging, destination)


def replace_dir(source: Path, destination: Path, *, files: Iterable[str] | None = None) -> Path:
    """Copy ``source`` (only the named ``files`` of it, if given) over ``destination``
    atomically (:func:`write_dir`)."""
    def copy(staging: Path) -> None:
        if files is None:
            shutil.copytree(source, staging)
            return
        staging.mkdir(parents=True)
        for name in files:
            shutil.copy2(source / name, staging / name)

    return write_dir(destination, copy)
