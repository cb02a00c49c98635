"""Output files and directories: the one place that decides how results reach the disk.

- Files are written beside their target and renamed into place, so a failure leaves nothing half-written.
- A command claims its output directory before any work (`claim_output_dir`): a lock file
  `.NAME.lock` beside the target, held with flock for the whole run, so a second run into the same
  `--out` fails at once instead of silently replacing the first one's output.
- Results are written into a staging directory `.NAME.stage-XXXXXXXX.partial` renamed into place at
  the end. Only the lock holder stages, so when the lock is taken every staging directory of that
  name is a leftover of a killed run and is swept.
- mkstemp/mkdtemp create 0600/0700 entries; outputs get the ordinary 0666/0777 minus the umask.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chai_compile.errors import ChaiError, OutputPathError

_STAGE_TAG = "stage-"


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def ordinary_permissions(path: Path) -> None:
    """0644/0755 under the usual umask, as open() and mkdir() would have made them."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        ordinary_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def check_output_dir(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output location that exists (unless --overwrite), is a file, or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path {out} is a file, not a directory",
                              fix="choose a directory path for --out (--overwrite replaces only directories)")
    if out.exists() and not overwrite:
        raise OutputPathError(f"output directory {out} already exists", fix="choose a new --out or pass --overwrite")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create {out}: {ancestor} is a file", fix="choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write to {ancestor} (permission denied)", fix="choose a writable --out")


@dataclass
class OutputClaim:
    """A locked output target; `stage()` yields the directory that becomes it."""

    out: Path
    overwrite: bool

    @contextmanager
    def stage(self) -> Iterator[Path]:
        parent, name = self.out.parent, self.out.name
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{name}.{_STAGE_TAG}", suffix=".partial", dir=parent))
            ordinary_permissions(stage)
        except OSError as e:
            raise OutputPathError(f"cannot write to {parent}: {e.strerror}", fix="choose a writable --out") from None
        try:
            yield stage
            if self.out.exists():
                # Old output aside first (under a staging name, so a kill here is swept next time), then
                # the new one in: at no point are both gone.
                old = Path(tempfile.mkdtemp(prefix=f".{name}.{_STAGE_TAG}", suffix=".partial", dir=parent))
                os.replace(self.out, old)
                os.replace(stage, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, self.out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


_HELD: dict[Path, OutputClaim] = {}  # claims of this process: a command's helpers may claim again


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning what was created (removed again if the run writes nothing)."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise OutputPathError(f"cannot create {parent}: {e.strerror}", fix="choose a writable --out") from None
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return


def _lock(out: Path) -> int:
    """flock the target's lock file; loop if it was unlinked (its holder finished) between open and flock."""
    path = _lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputPathError(f"cannot write to {out.parent}: {e.strerror}",
                                  fix="choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputPathError(f"another chai-compile run is writing {out}",
                                  fix="wait for it to finish, or choose another --out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def sweep_stale_stages(out: Path) -> list[Path]:
    """Remove staging directories of `out` left by killed runs; call only while holding its lock."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({_STAGE_TAG})?[A-Za-z0-9_]{{8}}\.partial$")
    stale = [p for p in out.parent.iterdir() if pattern.match(p.name) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@contextmanager
def claim_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[OutputClaim]:
    """Check and lock `out` for this run; released (lock file removed) when the block ends."""
    out = Path(out).absolute()
    if out in _HELD:
        yield _HELD[out]
        return
    check_output_dir(out, overwrite)
    created = _make_parents(out.parent)
    try:
        fd = _lock(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        check_output_dir(out, overwrite)  # again under the lock: a run that just finished may have made it
        sweep_stale_stages(out)
        _HELD[out] = claim = OutputClaim(out, overwrite)
        yield claim
    finally:
        _HELD.pop(out, None)
        _lock_path(out).unlink(missing_ok=True)  # while still held: a later run creates a fresh one
        os.close(fd)
        if not out.exists():
            _remove_empty(created)


@contextmanager
def staged_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `out`; on success it becomes `out`, on failure it vanishes."""
    with claim_output_dir(out, overwrite) as claim, claim.stage() as stage:
        yield stage


MAX_JSON_BYTES = 64 << 20  # far above any mapping or manifest; a bigger file is not one of ours
_MAX_INT_DIGITS = 19  # int64: every count and index we store fits; 5000-digit integers do not


def read_json_strict(path: Path, error: type[ChaiError], what: str, fix: str) -> Any:
    """Parse a JSON file we wrote, refusing what json.loads would accept or die on: non-UTF-8 bytes, NaN and
    Infinity, huge integers, absurd nesting. Every failure is `error` naming the file, never a traceback."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{what} {path} is {size} bytes, too large to be one", fix=fix)
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}", fix=fix) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start})", fix=fix) from None

    def bad_constant(name: str) -> Any:
        raise error(f"{what} {path} holds {name}; only finite numbers are valid", fix=fix)

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > _MAX_INT_DIGITS:
            raise error(f"{what} {path} holds a {len(s)}-digit integer", fix=fix)
        return int(s)

    def parse_float(s: str) -> float:
        x = float(s)
        if x in (float("inf"), float("-inf")):
            bad_constant(s[:20])
        return x

    try:
        return json.loads(text, parse_constant=bad_constant, parse_int=parse_int, parse_float=parse_float)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON (truncated or edited?): {e.msg} at line {e.lineno} column "
                    f"{e.colno}", fix=fix) from None
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be one", fix=fix) from None
