"""Atomic writes: a crash leaves the previous file/folder or the new one, never a mix.

Both helpers hand out a temporary path beside the target (same filesystem, so ``os.replace`` is
atomic), and move it into place only when the ``with`` block finished without an exception.
Contents are fsynced and take their permissions from the umask; temporaries that a killed save
left behind are removed by the next save of the same path.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}(?:\.tmp)?|old)$")  # what mkstemp/mkdtemp below make


def _clean_leftovers(path: Path) -> None:
    """Temp files / folders of an earlier save of ``path`` that was killed (names only recbase makes)."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and m["name"] == path.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a power cut keeps what was renamed."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, folder: bool) -> None:
    """Permissions from the umask (mkstemp / mkdtemp make 0600 / 0700: another user or container
    could not read a shared model) and the contents on disk before the rename."""
    mask = _umask()
    if folder:
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
                _fsync(Path(root, f))
        os.chmod(tmp, 0o777 & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)
    _fsync(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """``with atomic_file(p) as tmp: write(tmp)`` -> ``p`` holds the complete new file (fsynced,
    permissions from the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(Path(tmp), folder=False)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str | None = None):
    """``with atomic_dir(p) as tmp: write files into tmp`` -> folder ``p`` is the new one.

    Never deletes what recbase did not write: an existing non-empty ``p`` without the artifact's
    ``marker`` file (e.g. ``tokenizer.json``) is refused before anything is written, and entries of
    an existing artifact folder that the new save does not write (a user's notes, other files) are
    carried over into the new folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path: {path} exists and is not a folder; refusing to replace it")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise FileExistsError(
            f"path: {path} is a non-empty folder that is not a recbase artifact of this kind (no {marker}); "
            "refusing to replace it (its files would be lost). Save into a new or empty folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _publish(tmp, folder=True)
        old = None
        if path.exists():  # a folder cannot be replaced in one step: move the old one aside first
            for entry in path.iterdir():  # keep what this save does not write
                if not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files_into(folder: str | os.PathLike, last: tuple[str, ...] = ("config.json",)):
    """``with atomic_files_into(d) as tmp: write files into tmp`` -> each file is moved into the
    existing folder ``d`` whole (other files there are kept); names in ``last`` move last, so a
    config never points at weights that are not there yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming.", dir=folder))
    try:
        yield tmp
        _publish(tmp, folder=True)
        for f in sorted(tmp.iterdir(), key=lambda f: (f.name in last, f.name)):
            os.replace(f, folder / f.name)
        _fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
