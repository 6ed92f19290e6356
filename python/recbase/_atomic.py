"""Atomic writes: a crash leaves the previous file/folder or the new one, never a mix.

Both helpers hand out a temporary path beside the target (same filesystem, so ``os.replace`` is
atomic), and move it into place only when the ``with`` block finished without an exception.
Contents are fsynced and take their permissions from the umask; temporaries that a killed save
left behind are removed by the next save of the same path.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}(?:\.tmp)?|old)$")  # what mkstemp/mkdtemp below make


_CARRIED = ".recbase-carried.json"  # journal of a save by recbase <= 0.1.0 that moved user entries


def _clean_leftovers(path: Path) -> None:
    """Temp files / folders of an earlier save of ``path`` that was killed (names only recbase
    makes). A user's entry that a killed save of an earlier recbase was moving over (listed in the
    temp folder's journal) is moved back into ``path`` first, and an old version set aside by a save killed
    between its two renames is put back where no folder is -- never deleted."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["name"] != path.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if entry.name.endswith(".old") and not path.exists():
                os.replace(entry, path)  # the fallback swap died between its renames: restore
                continue
            _restore_carried(entry, path)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        (path / _CARRIED).unlink()  # a save killed right after its swap


def _restore_carried(leftover: Path, path: Path) -> None:
    try:
        names = json.loads((leftover / _CARRIED).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(names, list) or not path.is_dir():
        return
    for name in names:
        if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
            src, dst = leftover / name, path / name
            if (src.exists() or src.is_symlink()) and not (dst.exists() or dst.is_symlink()):
                os.replace(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a filesystem without hard links, or a cross-device bind mount
        shutil.copy2(src, dst, follow_symlinks=False)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes another name for ``src``'s contents: hard-linked files, re-made folders and
    symlinks (never followed)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
    carried over into the new folder as hard links: at every moment, killed or not, they are in the
    folder at ``path``.
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
        if not path.exists():
            os.replace(tmp, path)
            _fsync(path.parent)
            return
        # keep what this save does not write: hard links (a copy where links are not possible) in
        # the new folder, so the user's entries never leave the path -- before the swap the old
        # folder holds them, after it the new one
        carried = [e for e in path.iterdir() if e.name != _CARRIED and not (tmp / e.name).exists()]
        for entry in carried:
            _link_tree(entry, tmp / entry.name)
        if carried:
            _fsync(tmp)
        if _exchange(tmp, path):  # no moment without a folder at the path; tmp now holds the old
            _fsync(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # fallback (no renameat2): two renames; a kill between them is repaired by the next save
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # put everything back where it was before dropping the new version
        old = path.with_name(f".{path.name}.old")
        if not path.exists() and old.is_dir():
            os.replace(old, path)
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
