"""Crash-safe training checkpoints: written to a temporary directory, checksummed, fsynced, renamed into place.

A checkpoint is a directory `RUN/checkpoints/step-000100/` holding the HF-format model (config.json,
model.safetensors, tokenizer files), `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step)
and `checksums.json` (size and sha256 of every other file), written last. It becomes visible only by an atomic
rename, so a process killed at any moment leaves either the complete checkpoint or a `.tmp-*` directory that
readers ignore and the next save removes.

    save_checkpoint(run_dir, step, write_files, keep=2)      # write_files(tmp_dir) writes the payload
    latest_valid_checkpoint(run_dir, log) -> path or None   # newest checkpoint whose checksums verify
    verify_checkpoint(path)                                  # raises CorruptCheckpoint naming the bad file
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

from ._io import atomic_write_text, replace_dir, sha256_file
from .errors import UserError

CKPT_PREFIX = "step-"
CHECKSUMS = "checksums.json"
STATE_FILE = "trainer_state.pt"
_TMP_PREFIX = ".tmp-"


class CorruptCheckpoint(UserError):
    """A checkpoint directory whose files are missing, truncated or changed since they were written."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _payload_files(directory: str) -> list[str]:
    """Relative paths of the files of a checkpoint (checksums.json excluded), sorted."""
    out = []
    for root, _, names in os.walk(directory):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), directory)
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path))[len(CKPT_PREFIX):])


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Checkpoint directories of a run (renamed into place, so written completely unless changed afterwards),
    oldest first. Temporary directories of an interrupted save are ignored."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(CKPT_PREFIX) and n[len(CKPT_PREFIX):].isdigit()]
    names.sort(key=lambda n: int(n[len(CKPT_PREFIX):]))
    return [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]


def verify_checkpoint(path: str) -> None:
    """Check every file of a checkpoint against checksums.json; CorruptCheckpoint names the first problem."""
    sums_path = os.path.join(path, CHECKSUMS)
    if not os.path.isfile(sums_path):
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: it has no {CHECKSUMS} (written last), so it "
                                "was not finished or was written by an older mlmfast")
    try:
        with open(sums_path) as f:
            sums = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path}: {CHECKSUMS} is unreadable ({exc})") from None
    for rel, want in sorted(sums.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} is missing")
        size = os.path.getsize(file)
        if size != want["size"]:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} has {size} bytes, {want['size']} were "
                                    "written (truncated or overwritten)")
        if sha256_file(file) != want["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} does not match its sha256 checksum")
    extra = set(_payload_files(path)) - set(sums)
    if STATE_FILE not in sums:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: no {STATE_FILE}")
    if extra:
        raise CorruptCheckpoint(f"checkpoint {path} holds files that were not written with it: "
                                f"{', '.join(sorted(extra))}")


def latest_valid_checkpoint(run_dir: str, log: Callable[[str], None] = print,
                            set_aside_corrupt: bool = False) -> Optional[str]:
    """The newest checkpoint of a run that verifies. Each newer corrupt one is named in a log line and skipped
    (and with set_aside_corrupt renamed to corrupt-step-N, so later saves and rotations never meet it)."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint as exc:
            where = f"; moved to {set_aside(path)}" if set_aside_corrupt else ""
            log(f"warning: {exc}; skipping it{where}")
            continue
        return path
    return None


def save_checkpoint(run_dir: str, step: int, write_files: Callable[[str], None], keep: int) -> str:
    """Write a checkpoint for `step` atomically: `write_files(tmp)` fills a temporary directory, checksums.json
    is added, everything is fsynced, and the directory is renamed to checkpoints/step-NNNNNN. Then all but the
    newest `keep` checkpoints are removed (the new one is always kept). Returns the checkpoint's path."""
    if keep < 1:
        raise UserError(f"keep-checkpoints={keep} must be >= 1")
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for n in os.listdir(root):  # leftovers of a save that was killed
        if n.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    name = f"{CKPT_PREFIX}{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f"{_TMP_PREFIX}{name}-{os.getpid()}")
    os.makedirs(tmp)
    write_files(tmp)
    sums = {}
    for rel in _payload_files(tmp):
        file = os.path.join(tmp, rel)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        sums[rel] = {"size": os.path.getsize(file), "sha256": sha256_file(file)}
    atomic_write_text(os.path.join(tmp, CHECKSUMS), json.dumps({"step": step, "files": sums}, indent=1))
    _fsync_dir(tmp)
    # a re-run of the same step (after a resume) replaces it
    replace_dir(tmp, final, aside=os.path.join(root, f"{_TMP_PREFIX}old-{name}-{os.getpid()}"))
    _fsync_dir(root)
    older = [p for p in checkpoint_dirs(run_dir) if checkpoint_step(p) < step]
    for stale in older[:len(older) - (keep - 1)] if len(older) >= keep else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def set_aside(path: str) -> str:
    """Rename a corrupt checkpoint to checkpoints/corrupt-step-NNNNNN (kept for inspection, never loaded)."""
    root, name = os.path.split(os.path.normpath(path))
    dest = os.path.join(root, f"corrupt-{name}")
    k = 1
    while os.path.exists(dest):
        dest = os.path.join(root, f"corrupt-{name}.{k}")
        k += 1
    os.replace(path, dest)
    return dest
