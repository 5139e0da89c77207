"""Output directories that never lose what a user had: checked before any work, written aside
and swapped in.

`check_out(path, ...)` runs before a command loads its model: an `--out` that is a file, that
cannot be created or written (`/proc/foo`, a read-only parent) or that already holds results is
refused at once, instead of after an hour of work. It also removes the temporary folders an
earlier, killed run of this tool left beside the target (`.NAME.tmp-*`, `.NAME.old-*`: only
ours, by their name) and says so in one line.

`staged(path)` gives a fresh temporary directory beside the target; on success its files replace
the command's own files in the target (files it did not write this time, such as an earlier
run's `layers_*.json`, are removed only when they match the command's own patterns).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from rsparse.errors import BadInputError

# prefixes of the temporary folders this tool creates beside a target (tempfile.mkdtemp names)
TEMP_MARKERS = (".tmp-", ".old-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """mkdtemp makes 0700 folders; give what we publish the user's usual permissions (umask)."""
    path = Path(path)
    mask = _umask()
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def stale_temps(target: Path) -> list[Path]:
    """Temporary folders of this tool left beside `target` by an interrupted run."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir()
                  if p.is_dir() and any(p.name.startswith(f".{target.name}{m}") for m in TEMP_MARKERS))


def remove_stale_temps(target: Path) -> None:
    stale = stale_temps(target)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} temporary folder(s) of an interrupted earlier run beside {target}: "
              f"{', '.join(p.name for p in stale)}", file=sys.stderr)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path, flag: str = "--out") -> Path:
    """An output directory that can be created and written; refuses a file and an unwritable place."""
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_dir():
        raise BadInputError(f"{flag} {target} is a file, not a directory: name a directory")
    base = _nearest_existing(target)
    if not base.is_dir():
        raise BadInputError(f"{flag} {target} cannot be created: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK) or _is_pseudo_fs(base):
        raise BadInputError(f"{flag} {target} is not writable (no write permission in {base}): "
                            "choose a directory you can write to")
    return target


def _is_pseudo_fs(path: Path) -> bool:
    # /proc and /sys pass os.access for root but refuse new files; try one.
    try:
        fd, name = tempfile.mkstemp(prefix=".rsparse-write-test-", dir=path)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


def check_out(path, *, results=("results.json",), overwrite: bool = False, resume: bool | None = None,
              flag: str = "--out") -> Path:
    """Check an output directory before any work (see the module docstring); returns it, absolute.
    resume: None for a command without --resume, else its value."""
    target = check_writable(path, flag)
    held = [name for name in results if target.is_dir() and any(target.glob(name))]
    if held and not overwrite and not resume:
        how = "--overwrite to replace them" + (" or --resume to continue" if resume is not None else "")
        raise BadInputError(f"{flag} {target} already holds results ({', '.join(held)}): pass {how}, "
                            "or choose another directory")
    remove_stale_temps(target)
    return target


@contextlib.contextmanager
def staged_replacement(target: Path):
    """A temporary directory beside `target` to write a whole directory into; on success it gets the
    usual permissions and replaces `target` (the old one, if any, is removed only once the new one
    is in place); on any failure, or Ctrl-C, it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        normal_permissions(tmp)  # mkdtemp made it 0700
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


@contextlib.contextmanager
def staged(path, own=("results.json", "results.md", "layers_*.json")):
    """A temporary directory beside `path`; on success its files move into `path` and the command's
    own earlier files (names matching `own`) that it did not write again are removed."""
    target = Path(os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        target.mkdir(parents=True, exist_ok=True)
        new = {p.name for p in tmp.iterdir()}
        for old in target.iterdir():
            if old.is_file() and old.name not in new and any(fnmatch.fnmatch(old.name, pat) for pat in own):
                old.unlink()
        for p in tmp.iterdir():
            os.replace(p, target / p.name)  # atomic per file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
