"""Small file helpers shared by the tokenizer, the trainer, checkpoints, prepared shards and the benchmark report:
writes that a reader (or a killed process) never sees half done, and file checksums."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

HASH_CHUNK = 1 << 22  # bytes read at a time when hashing a file


@contextlib.contextmanager
def _replaced_by(tmp: str, path: str | os.PathLike):
    """Run the body (which writes `tmp`), then rename `tmp` over `path`; on any failure remove `tmp` and re-raise,
    so `path` is either untouched or complete."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def default_modes(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes an ordinary open()/mkdir would have under
    the process's umask. mkstemp / mkdtemp and safetensors create 0600 files and 0700 directories: published
    under those, a run's model, checkpoints or prepared shards would be unreadable to the other users of a shared
    disk (other nodes' ranks, a colleague loading the model)."""
    mask = _umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file in the same directory, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    default_modes(tmp)  # mkstemp's 0600 -> what open() would have given
    with _replaced_by(tmp, path):
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON (one trailing newline), written with `atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_savefig(fig, path: str | os.PathLike, dpi: int) -> None:
    """Save a matplotlib figure as PNG under a temporary name, then rename it over `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    with _replaced_by(tmp, path):
        fig.savefig(tmp, dpi=dpi)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (OSError if it cannot be read)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike, aside: str | os.PathLike) -> None:
    """Rename directory `src` to `dest`. An existing `dest` is first renamed to `aside` and deleted afterwards,
    so at every moment `dest` is either the old directory, absent, or the new one (never a mix). `src` gets the
    umask's default modes first (see default_modes)."""
    default_modes(src)
    if os.path.exists(dest):
        os.replace(dest, aside)
        os.replace(src, dest)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dest)
