"""The converter's output folder: written beside ``--out`` and moved into place so that ``--out`` never holds a
half-written model, and what a killed run leaves behind is restored or removed by the next run.

A run writes into a hidden ``.<out>.<pid>.<random>.partial`` folder. Replacing an existing ``--out`` swaps the
two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the OS lacks it, ``--out`` is first moved
into a hidden ``.old`` folder, then the new one is renamed in, and a run killed between those two renames is
repaired by the next run (:func:`recover_leftovers` puts the old model back).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["check_out_folder", "exchange_paths", "make_readable", "recover_leftovers", "replace_folder", "temp_sibling"]


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Restore or clean what a killed run left next to ``out``, then refuse an existing ``out`` without
    ``overwrite`` (a ``FileExistsError``), or one that is not a folder (``NotADirectoryError``)."""
    recover_leftovers(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")


def temp_sibling(out: Path, suffix: str) -> Path:
    """A new hidden ``.<name>.<pid>.<random><suffix>`` folder next to ``out`` (the pid tells a live run's)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=suffix, dir=out.parent))


def _leftovers(out: Path, suffix: str) -> list[Path]:
    """Hidden ``.<name>.<pid>.<random><suffix>`` folders of runs that are no longer alive, newest first."""
    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*{suffix}") if out.parent.is_dir() else ():
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_leftovers(out: Path) -> list[str]:
    """A run killed while replacing ``out`` may leave ``out`` moved aside (``.old``) and temp folders
    (``.partial``): put the old model back where ``out`` is missing, and remove the rest. Returns what it did."""
    done = []
    for old in _leftovers(out, ".old"):
        saved = old / out.name
        if not out.exists() and saved.is_dir():
            os.replace(saved, out)
            done.append(f"restored {out} from {old.name}")
        shutil.rmtree(old, ignore_errors=True)
    for partial in _leftovers(out, ".partial"):
        shutil.rmtree(partial, ignore_errors=True)
        done.append(f"removed {partial.name}")
    return done


def replace_folder(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``. An existing ``out`` (``--overwrite``) is swapped with ``tmp`` in one atomic
    ``renameat2(RENAME_EXCHANGE)`` where the OS has it, so ``out`` holds a complete model at every instant
    (``tmp`` then holds the old model, which the caller removes); elsewhere ``out`` is moved into a hidden
    ``.old`` folder first, which the next run puts back if a kill came between the two renames."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if exchange_paths(tmp, out):
        return
    old = temp_sibling(out, ".old")
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old)


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder: give the output the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)
