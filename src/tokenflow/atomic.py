"""Atomic writes: write beside the target under a temporary name, then rename over it.

Every file and folder the project writes goes through :func:`atomic_path` or
:func:`atomic_dir`, so a target path holds either its old content or the complete new one,
never half of it, whatever happens in between (an error, a full disk, Ctrl-C, SIGTERM).
Temporary names carry the writer's process id: a run killed outright (SIGKILL, a power cut
of the job) leaves its temporary behind, and the next write of the same target removes
those whose process is gone, never those of a run that is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from typing import Iterator

from .errors import TokenFlowError

# '.{name}.{pid}-{random}.tmp{ext}' beside the target
_TMP_RE = r"\.{base}\.(\d+)-[0-9a-f]{{8}}\.tmp{ext}"
# longest suffix a temporary name adds to the target's name: '.' + '.' + pid + '-' + 8 hex + '.tmp'
TMP_NAME_EXTRA = 2 + 10 + 1 + 8 + 4
DIR_SUFFIX = ".d"  # a temporary folder's name ends so


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _tmp_name(path: str, ext: str) -> str:
    base = os.path.basename(path)
    base = base[:-len(ext)] if ext and base.endswith(ext) else base
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}")


def clean_stale(path: str | os.PathLike, ext: str = "") -> list[str]:
    """Remove the temporaries that killed runs left for ``path``; returns what was removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    base = base[:-len(ext)] if ext and base.endswith(ext) else base
    pattern = re.compile(_TMP_RE.format(base=re.escape(base), ext=re.escape(ext)) + r"\Z")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            stale = os.path.join(folder, name)
            try:
                shutil.rmtree(stale) if os.path.isdir(stale) and not os.path.islink(stale) else os.remove(stale)
                removed.append(stale)
            except OSError:
                pass
    return removed


def _mode_from_umask(default: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return default & ~umask


def is_write_error(e: BaseException) -> bool:
    """An OS error, or a library's wrapping of one (safetensors reports a full disk as its own error)."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def write_failure(path: str, e: BaseException) -> TokenFlowError:
    """The one-line error for an OS error while writing ``path`` (a full disk, a lost mount...)."""
    text = str(e)
    reason = getattr(e, "strerror", None) or (text.splitlines()[0][:120] if text else type(e).__name__)
    if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text:
        reason = "no space left on the device"
    return TokenFlowError(f"cannot write '{path}': {reason}; nothing was written there")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same extension); on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an OS error
    (a full disk, say) comes out as a one-line :class:`TokenFlowError`.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1]
    clean_stale(path, ext)
    tmp = _tmp_name(path, ext)
    try:
        with open(tmp, "xb"):
            pass
        yield tmp
        os.chmod(tmp, _mode_from_umask(0o666))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_write_error(e):
            raise write_failure(path, e) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaceable=lambda name: False) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is swapped out and removed only if every entry in it is
    ``replaceable(name)`` (e.g. frames an earlier run wrote); otherwise this refuses before
    anything is written, so a folder of the user's own files is never deleted.
    """
    path = os.path.abspath(os.fspath(path))
    check_replaceable_dir(path, replaceable)
    clean_stale(path, DIR_SUFFIX)
    tmp = _tmp_name(path, DIR_SUFFIX)
    try:
        os.mkdir(tmp, _mode_from_umask(0o777) | 0o700)
        yield tmp
        if os.path.isdir(path):
            old = _tmp_name(path, DIR_SUFFIX)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_failure(path, e) from None
        raise


def check_replaceable_dir(path: str, replaceable) -> None:
    """Refuse a folder target that holds anything but what ``replaceable`` allows (or is a file)."""
    if os.path.isdir(path):
        foreign = [n for n in os.listdir(path) if not replaceable(n)]
        if foreign:
            raise TokenFlowError(f"folder '{path}' holds other files (e.g. '{foreign[0]}'); "
                                 f"give a new or empty folder, or one an earlier run wrote")
    elif os.path.lexists(path):
        raise TokenFlowError(f"'{path}' is a file, not a folder")
