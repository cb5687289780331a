"""The one rule every writer follows, in one place.

- Never write over an input of the run.
- Never replace a file this run did not create, unless the user asked (``--exist-ok``).
- Check every destination before the first write (:class:`OutputPlan`), so a refused run writes nothing.
- Write every file and folder through a temporary name in its folder and an atomic rename
  (:func:`atomic_path`, :func:`atomic_write`), so an interruption leaves the previous complete file or
  none, never half of one. Temporaries an interrupted run left behind are removed the next time a run
  writes into that folder (:func:`clean_stale_temps`).
- A full disk is one line naming the folder (:class:`NoSpaceError`), not a library's traceback.

Append-only logs (a stage's ``log.txt``, TensorBoard event files) are the only files written in place.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from utils.errors import UserError

# ``.<name>.<8 characters>.tmp`` (+ the name's suffix for writers that pick a format by it)
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
FULL_BELOW = 1 << 20  # bytes free under which a failed write is reported as a full disk


class NoSpaceError(UserError):
    """A write failed because its file system is full."""


def temp_name(path: Path) -> Path:
    """A fresh temporary sibling of ``path`` that :func:`clean_stale_temps` recognises; it keeps the
    suffix, since OpenCV and matplotlib choose the format by it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")


def is_temp(path: Path) -> bool:
    return bool(_TMP.match(path.name))


def display_name(path: Path) -> str:
    """The name a temporary stands for (``.best.onnx.1a2b3c4d.tmp.onnx`` -> ``best.onnx``), for messages."""
    m = _TMP.match(path.name)
    return m.group("name") if m else path.name


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporaries an interrupted writer left in ``folder`` (only names :func:`temp_name`
    makes); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if is_temp(p):
            _remove(p)
            removed.append(p)
    return removed


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def _no_space(path: Path, e: BaseException) -> NoSpaceError | None:
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (isinstance(e, (OSError, RuntimeError)) and _disk_full(path.parent)):
        return NoSpaceError(f"no space left on {path.parent} while writing {path.name}; free some space "
                            f"and run the command again")
    return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (a new empty folder with ``folder``); it becomes
    ``path`` in one rename when the block ends, and is removed if the block fails.

    A file replaces an existing ``path`` in the rename; a folder replaces an existing one through
    :func:`replace_folder`. The caller has decided that ``path`` may be replaced (:class:`OutputPlan`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and path.is_dir() and any(path.iterdir()):
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        full = _no_space(path, e)
        _remove(tmp)
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Create the folder ``path`` (and its missing parents) for a run's outputs; when the run fails
    before writing anything into it, remove the folders this call created (a failed command leaves no
    empty run folder), never one that existed before."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):  # not empty: it holds outputs, which stay
                p.rmdir()
        raise


def replace_folder(new: Path, old: Path) -> None:
    """Swap the finished folder ``new`` in for ``old``: ``old`` is renamed aside, ``new`` renamed in,
    and only then the old copy removed (the caller has checked ``old`` may go)."""
    aside = temp_name(old)
    os.replace(old, aside)
    try:
        os.replace(new, old)
    except BaseException:
        os.replace(aside, old)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes or a buffer, text as UTF-8, or a function given the open binary file) to ``path``
    through a temporary file and a rename; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        if isinstance(data, str):
            f.write(data.encode())
        elif callable(data):
            data(f)
        else:  # bytes or any buffer (a NumPy array of encoded image bytes)
            f.write(data)
    return path


def save_torch(obj: object, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`. Serialised in memory first, so a full disk is an
    ``OSError`` of the file write rather than an opaque error from PyTorch's zip writer."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getbuffer())


def save_npy(path: str | Path, array) -> Path:
    """A NumPy array as ``.npy`` (no pickled objects) through :func:`atomic_write`."""
    import numpy as np

    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def save_figure(fig, path: str | Path, **kw) -> Path:
    """A matplotlib figure through :func:`atomic_path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kw)
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (links included); a missing path is compared by name."""
    a, b = Path(a), Path(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


class OutputPlan:
    """The files (and folders) one run will write, checked together before the first write.

    ``inputs`` are never written over, whatever the flags. A destination that already exists is
    refused unless ``exist_ok`` (the user passed ``flag``). ``check`` raises one UserError naming the
    first conflict and the flag; it also removes temporaries that an interrupted earlier run left in
    the destination folders.
    """

    def __init__(self, inputs: Iterable[str | Path | None] = (), exist_ok: bool = False,
                 flag: str = "--exist-ok", replaceable: Callable[[Path], bool] | None = None):
        self.inputs = [Path(p) for p in inputs if p]
        self.exist_ok, self.flag = exist_ok, flag
        self.replaceable = replaceable  # for folders: whether an existing one may go (it is ours)
        self.paths: dict[Path, str] = {}  # destination -> what writes it (for messages)

    def add(self, path: str | Path, what: str = "") -> Path:
        path = Path(path)
        key = Path(os.path.abspath(path))
        if key in self.paths and self.paths[key] != what:
            raise UserError(f"{path}: both {self.paths[key] or 'an output'} and {what or 'an output'} would "
                            f"be written there; rename one of the sources")
        self.paths[key] = what
        return path

    def conflicts(self) -> Iterator[str]:
        for path, what in self.paths.items():
            of = f" ({what})" if what else ""
            for i in self.inputs:
                if same_file(path, i):
                    yield f"{path}{of}: would overwrite the input {i}; choose another output"
            if not path.exists() and not path.is_symlink():
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    continue
                if not (self.exist_ok and self.replaceable is not None and self.replaceable(path)):
                    hint = f"pass {self.flag} to replace it" if self.replaceable else "move it away"
                    if self.replaceable and self.exist_ok:
                        hint = "it is not one this program wrote, so it is left alone; move it away"
                    yield f"{path}{of}: a folder exists there; {hint} or choose another output"
            elif not self.exist_ok:
                yield f"{path}{of}: exists; pass {self.flag} to replace it, or choose another output"

    def check(self) -> None:
        for problem in self.conflicts():
            raise UserError(problem)
        for folder in {p.parent for p in self.paths}:
            clean_stale_temps(folder)
