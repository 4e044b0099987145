"""Where outputs go: nothing the user did not ask to replace is ever replaced or deleted.

Every command that writes a directory (``mk merge``, ``mk svd-hybrid compress`` and
``reconstruct``, the digits pool) checks its destination with :func:`check_destination` before
any long work, and writes it through :class:`AtomicDirectory`:

- a destination that is, contains, or lies inside one of the command's inputs is refused, even
  with ``force`` (writing it would destroy the input);
- an existing file (not a directory) is refused;
- an empty directory, or a previous output of ``mk`` of a kind the new one may replace (it
  holds :data:`MARKER`, and nothing but the files that marker lists; a model or adapter replaces
  a model or adapter, an artifact an artifact, and nothing replaces a run bundle), is replaced;
- any other non-empty directory is refused unless ``force``; with ``force`` its entries are
  returned so the caller can say what was replaced;
- never replaced, even with ``force``: the file system's root, the home directory and the
  folders above it, the working directory and the folders above it, and folders that hold a git
  repository at any depth.

The new contents are written into a hidden temporary directory beside the destination and
swapped in at the end (one ``renameat2(RENAME_EXCHANGE)`` on Linux, so an interrupted write
never leaves a partial or missing destination), after every file was flushed to disk.
Temporaries left by a killed process are removed by the next write beside them. New directories and files get the permissions the
process umask gives any new file.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_core.errors import UsageError

MARKER = ".mergekit-output.json"
"""Written into every output directory: what wrote it and which files it holds."""

_TEMPORARY = re.compile(r"^\..+\.mk-(?:tmp|old)-(\d+)-[0-9a-f]+$")
"""Names of :class:`AtomicDirectory` temporaries: ``.<dest>.mk-tmp-<pid>-<hex>``."""
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def resolve(path: Path | str) -> Path:
    """``path`` made absolute with symlinks and ``..`` resolved (it need not exist)."""
    return Path(path).expanduser().resolve()


def relation(a: Path | str, b: Path | str) -> str | None:
    """How path ``a`` relates to path ``b``: ``"is"``, ``"lies inside"``, ``"contains"`` or None."""
    ra, rb = resolve(a), resolve(b)
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "lies inside"
    if ra in rb.parents:
        return "contains"
    return None


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file or directory under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


REPLACEABLE_BY = {"model": {"model", "adapter"}, "adapter": {"model", "adapter"}}
"""Which kinds of previous output a new output of a kind may replace without ``force``: a merged
model or adapter another merged model or adapter; an artifact or a pool only the same kind; a run
bundle (a record) nothing."""


def _previous_output(path: Path) -> tuple[str, set[str]] | None:
    """(kind, files) of a previous ``mk`` output directory, or None if it is not one."""
    try:
        data = json.loads((path / MARKER).read_text())
        files, kind = data["files"], data.get("kind", "output")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return str(kind), set(files) | {MARKER}


def _file_above(dest: Path) -> Path | None:
    """The first existing folder-to-be above ``dest`` that is a file (``out.bin/merged``)."""
    for parent in Path(dest).absolute().parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_destination(
    dest: Path | str,
    *,
    inputs: Iterable[Path | str] = (),
    force: bool = False,
    what: str = "output",
    kind: str = "output",
) -> list[str]:
    """Refuse a destination whose writing would replace something the user did not ask to replace.

    ``inputs``: every file or directory the command reads (base, sources, artifacts).
    ``kind``: what will be written (``model``, ``adapter``, ``svd_hybrid_artifact``, ...); a
    previous output of another kind needs ``force`` (:data:`REPLACEABLE_BY`).
    Returns the names of the entries of ``dest`` that only ``force`` lets the write replace (empty
    for a new or empty directory and for a previous output of ``mk``).

    Raises:
        UsageError: ``dest`` is, contains or lies inside an input; ``dest`` is an existing file;
            ``dest`` is a non-empty directory not written by ``mk`` and ``force`` is false; or
            ``dest`` is a non-empty root, home, working directory (or above) or git repository.
    """
    dest = Path(dest)
    for item in inputs:
        rel = relation(dest, item)
        if rel is not None:
            raise UsageError(
                f"{what} {dest} {rel} the input {item}; writing it would replace that input",
                hint=f"choose another place for the {what}, outside every input",
            )
    if dest.is_symlink() and not dest.exists():
        raise UsageError(f"{what} {dest} is a broken symbolic link", hint="remove it or choose another path")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{what} {dest} is an existing file, not a directory",
                         hint="choose a directory name, or remove the file first")
    blocking = _file_above(dest)
    if blocking is not None:
        raise UsageError(f"{what} {dest}: {blocking} is a file, so no folder can be made inside it",
                         hint=f"choose another place for the {what}")
    if not dest.is_dir():
        return []
    try:
        entries = sorted(p.name for p in dest.iterdir())
    except OSError as exc:
        raise UsageError(f"{what} {dest}: cannot list it ({exc.strerror})") from None
    if not entries:
        return []
    protected = _protected(dest)
    if protected:
        raise UsageError(f"{what} {dest} is {protected}; mk never replaces it, even with --force",
                         hint=f"choose a new directory for the {what}, e.g. {dest / 'merged'}")
    previous = _previous_output(dest)
    if previous is not None and set(entries) <= previous[1] and previous[0] in REPLACEABLE_BY.get(kind, {kind}):
        return []
    if not force:
        foreign = [e for e in entries if previous is None or e not in previous[1]] or entries
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        if previous is None:
            why = "mk did not write it"
        elif not set(entries) <= previous[1]:
            why = "it holds files the previous mk output did not write"
        else:
            why = f"it holds a {previous[0].replace('_', ' ')}, not a {kind.replace('_', ' ')} mk may replace"
        raise UsageError(
            f"{what} {dest} is a non-empty directory and {why} ({shown})",
            hint="choose a new directory, or pass --force to replace all of its contents",
        )
    return entries


def _protected(dest: Path) -> str | None:
    """Why replacing the existing directory ``dest`` would be a disaster whatever the flags say:
    the file system's root, the home directory or a folder above it, the working directory or a
    folder above it, or a git repository."""
    target = resolve(dest)
    if target == Path(target.anchor):
        return "the root of the file system"
    try:
        home = resolve(Path.home())
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    if home is not None and (target == home or target in home.parents):
        return "your home directory" if target == home else f"a folder that contains your home directory ({home})"
    cwd = resolve(Path.cwd())
    if target == cwd or target in cwd.parents:
        return "the working directory" if target == cwd else "a folder that contains the working directory"
    repository = _repository_inside(target)
    if repository is not None:
        return ("a git repository (it holds .git)" if repository == target
                else f"a folder that holds a git repository ({repository})")
    return None


def _repository_inside(root: Path) -> Path | None:
    """The first folder at or below ``root`` that holds ``.git`` (symbolic links not followed)."""
    for folder, dirs, files in os.walk(root):
        if ".git" in dirs or ".git" in files:
            return Path(folder)
    return None


def check_inside_nothing(dest: Path | str, inputs: Iterable[Path | str], what: str) -> None:
    """For append-only roots (run bundles, sweep and evaluation records): refuse a ``dest`` that
    is or lies inside an input, or that is an existing file. It may contain inputs: nothing in it
    is replaced."""
    for item in inputs:
        rel = relation(dest, item)
        if rel in ("is", "lies inside"):
            raise UsageError(f"{what} {dest} {rel} the input {item}; mk would write into that input",
                             hint=f"choose another place for the {what}, outside every input")
    if Path(dest).exists() and not Path(dest).is_dir():
        raise UsageError(f"{what} {dest} is an existing file, not a directory",
                         hint="choose a directory name, or remove the file first")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """An ``OSError`` raised inside without a file name (a failed ``write``, ``flush`` or
    ``fsync`` on an open file: a full disk, an I/O error) is re-raised naming ``path``, so the
    one-line error says which file."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def _settle_tree(root: Path) -> None:
    """Give every new file and folder under ``root`` the umask's permissions (some writers, such
    as safetensors' ``save_file``, create files 0600) and flush them to disk."""
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                with naming(path):
                    os.fchmod(fd, file_mode)
                    os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


class AtomicDirectory:
    """``with AtomicDirectory(dest, inputs=...) as tmp:`` write into ``tmp``; it becomes ``dest``
    when the block ends without an error, and is removed otherwise.

    The destination is checked (:func:`check_destination`) on entry and again just before the
    swap. ``kind`` is recorded in the directory's :data:`MARKER`. ``replaced`` lists what the
    write replaced (after a ``force``).
    """

    def __init__(self, dest: Path | str, *, inputs: Iterable[Path | str] = (), force: bool = False,
                 kind: str = "output", what: str = "output") -> None:
        self.dest = Path(dest)
        self.inputs = list(inputs)
        self.force = force
        self.kind = kind
        self.what = what
        self.tmp: Path | None = None
        self.replaced: list[str] = []

    def _sibling(self, role: str) -> Path:
        return self.dest.with_name(f".{self.dest.name}.mk-{role}-{os.getpid()}-{secrets.token_hex(3)}")

    def _remove_stale(self) -> None:
        """Remove the temporaries that killed ``mk`` processes left beside the destination."""
        try:
            siblings = list(self.dest.parent.iterdir())
        except OSError:
            return
        for p in siblings:
            m = _TEMPORARY.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> Path:
        self.replaced = check_destination(self.dest, inputs=self.inputs, force=self.force, what=self.what,
                                          kind=self.kind)
        if self.dest.is_symlink():
            self.dest = resolve(self.dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.tmp = self._sibling("tmp")
        self.tmp.mkdir(mode=0o700)
        os.chmod(self.tmp, default_mode(directory=True))
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._write_marker()
            _settle_tree(self.tmp)
            self.replaced = check_destination(self.dest, inputs=self.inputs, force=self.force, what=self.what,
                                              kind=self.kind)
            self._swap()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _write_marker(self) -> None:
        from mergekit_core.version import __version__

        assert self.tmp is not None
        files = sorted(p.name for p in self.tmp.iterdir())
        (self.tmp / MARKER).write_text(json.dumps(
            {"written_by": f"mergekit-core {__version__}", "kind": self.kind, "files": files}, indent=2) + "\n")

    def _swap(self) -> None:
        assert self.tmp is not None
        if not self.dest.exists():
            os.rename(self.tmp, self.dest)
        elif _exchange(self.tmp, self.dest):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now holds the old contents
        else:
            old = self._sibling("old")
            os.rename(self.dest, old)
            try:
                os.rename(self.tmp, self.dest)
            except OSError:
                os.rename(old, self.dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.dest.parent)
