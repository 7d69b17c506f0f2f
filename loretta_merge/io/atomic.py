"""Publish an output directory atomically and durably.

:func:`atomic_output_dir` yields a temporary directory beside the output; when the body
succeeds, every file and directory in it is fsynced, it is renamed into place, and the
parent directory is fsynced, so after "done" a power cut leaves either the old output or
the complete new one, never empty files. On any failure the temporary directory is removed
and the output is left as it was. File-system failures in the body (a full disk, a
permission error) are mapped to :class:`OutputError` by :func:`writer.output_error`, naming
the output the user asked for rather than the temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from ..errors import OutputError, OutputExistsError
from .writer import make_output_error, output_error

# ``.<OUT name>.loretta-tmp-<host>-<pid>-<hex>`` (and ``-old-`` for a --force run's previous
# output). The host is part of the name because a PID means something only on its own host:
# on shared storage (NFS, Lustre) a temp of a run on another node has a PID that is not
# alive here, and it must not be reaped. Names without a host (written by older versions)
# match nothing here and are left alone, since whose they are cannot be told.
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.loretta-(?:tmp|old)-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>[0-9]+)"
                      r"-[0-9a-f]+")


def host_tag() -> str:
    """This host's name as it goes into temp names: characters outside ``[A-Za-z0-9_.-]``
    become ``_``, at most 64 of them (``unknown-host`` when the name is empty)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
    return name or "unknown-host"


def fsync_path(path: Path) -> None:
    """fsync one file or directory (directories make renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (symlinks are not followed),
    files first, then directories bottom-up, ``root`` last."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            if not (here / name).is_symlink():
                fsync_path(here / name)
        fsync_path(here)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove temporary directories beside ``out`` left by runs on this host that were
    killed (their process no longer exists). Temps of other hosts (shared storage) and
    temps without a host in their name are never touched. Returns what was removed."""
    removed = []
    host = host_tag()
    with contextlib.suppress(OSError):
        for p in out.parent.iterdir():
            m = _TEMP_RE.fullmatch(p.name)
            if (m and m.group("name") == out.name and m.group("host") == host
                    and not _pid_alive(int(m.group("pid")))):
                if ".loretta-old-" in p.name and not out.exists():
                    os.replace(p, out)  # a --force run was killed between its two renames
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is a file; choose a directory path")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force (force=True) to "
                                f"replace it, or choose another output path")


def _make_temp(out: Path) -> Path:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise make_output_error(OutputError, exc.errno, f"cannot create the output's parent directory {parent} "
                          f"for {out} ({exc.strerror or exc}); choose an output path in a directory you "
                          f"can write to") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (permission denied) for {out}; choose an output "
                          f"path in a directory you can write to")
    remove_stale_temps(out)
    tmp = parent / f".{out.name}.loretta-tmp-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp)  # mode 0o777 minus the umask, like any new directory
    except OSError as exc:  # root passes os.access on read-only mounts such as /proc
        raise make_output_error(OutputError, exc.errno, f"cannot write to {parent} ({exc.strerror or exc}) for {out}; choose "
                          f"an output path in a directory you can write to") from exc
    return tmp


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """fsync ``tmp``'s tree, rename it to ``out`` (keeping an old ``out`` until the new
    one is in place), fsync the parent."""
    fsync_tree(tmp)
    if out.exists():
        if not force:
            raise OutputExistsError(f"output {out} appeared while writing; the new result "
                                    f"was discarded; pass --force to replace it")
        old = tmp.with_name(tmp.name.replace(".loretta-tmp-", ".loretta-old-"))
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)


def _name_output(exc: OSError, tmp: Path, out: Path) -> OSError:
    """The mapped error, naming ``out`` where it named the temporary directory."""
    mapped = output_error(exc, exc.filename or out)
    if isinstance(mapped, OutputError) and str(tmp) in str(mapped):
        return make_output_error(type(mapped), mapped.errno, str(mapped).replace(str(tmp), str(out)))
    return mapped


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success make it durable and
    rename it to ``out``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out`` is left as it was. An existing ``out`` is refused unless ``force``; with
    ``force`` the old ``out`` stays intact until the new one is complete. Temporary
    directories of killed runs on this host are removed on the next run (the host name
    is part of a temp's name; see :func:`remove_stale_temps`).
    """
    out = Path(os.path.abspath(out))
    _check_target(out, force)
    tmp = _make_temp(out)
    try:
        yield tmp
        _publish(tmp, out, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = _name_output(exc, tmp, out)
        if mapped is exc:
            raise
        raise mapped from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
