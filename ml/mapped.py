"""A model's large tensors shared by the processes of one machine through the page cache.

The word table dominates a model (the bundled one: 400,000 x 50, float16 in weights.safetensors,
float32 in use): loaded the usual way, every process holds its own float32 copy (80 MB). Here each
tensor of at least ``MIN_BYTES`` (as float32) is written once, as float32, to a cache file, and every
process maps that file copy-on-write: they all read the same pages of the page cache, and a process
that writes to the tensor (a fine-tune) gets private copies of just the pages it writes. The numbers
are those of the usual load (float16 -> float32 is exact), and each file is compared with its source
before use, so a tagger reads exactly what it would have read from a private copy.

Cache files: ``<cache dir>/<sha256 of weights.safetensors>/<tensor name>.f32``, a 4 KiB header (JSON:
format, source hash, name, shape) and then the raw numbers, so the data starts on a page boundary. The
cache dir is ``MODEL_CACHE_DIR`` (``off``: no mapping), else ``ner-model-cache-<uid>`` under the
system temp dir. A file is written under an exclusive lock to a temporary name and renamed into place:
a reader never maps a partial file, and workers started together map one file, not one each. A file
whose header, size or numbers do not match is rewritten; where the cache cannot be used (read-only
filesystem, no permission, a folder another user could write to) the tensor is a private copy, and
one warning line says why.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("ml.mapped")

KEEP_MODELS = 4  # weights whose cache files are kept (the most recently loaded)
MIN_BYTES = 1 << 20  # smaller tensors stay private copies: a page table entry each is not worth it
HEADER_BYTES = 4096
MAGIC = "ner-mapped-tensor"
VERSION = 1
_CHUNK_ROWS = 1 << 16  # rows compared at a time (a bounded temporary)


class CacheUnusable(OSError):
    """The cache folder cannot be used safely (not ours, writable by others, not a folder)."""


def default_cache_dir() -> Path | None:
    """``MODEL_CACHE_DIR``; ``None`` when it is ``off``; else ner-model-cache-<uid> in the temp dir."""
    value = os.environ.get("MODEL_CACHE_DIR", "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    return Path(tempfile.gettempdir()) / f"ner-model-cache-{os.getuid()}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def map_large_tensors(state: dict[str, Tensor], source_hash: str, cache_dir: Path, min_bytes: int | None = None) -> dict[str, Tensor]:
    """``state`` (as read from weights.safetensors, floats in any precision) with every floating
    tensor as float32: mapped from its cache file if it has at least ``min_bytes`` (default
    ``MIN_BYTES``) as float32, a private copy otherwise (and wherever the cache cannot be used: one
    warning line)."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    large = {k: v for k, v in state.items() if v.is_floating_point() and v.dim() > 0 and v.numel() * 4 >= min_bytes}
    # copies, not views: safetensors' tensors may be views of its own mapping of the whole file,
    # which one of them kept alive would keep mapped (and the pages read for the check resident)
    out = {k: _copy(v) for k, v in state.items() if k not in large}
    if not large:
        return out
    try:
        folder = _private_folder(cache_dir, source_hash)
        with _locked(folder):
            for key, value in large.items():
                out[key] = _mapped(folder / f"{key}.f32", key, value, source_hash)
    except OSError as e:
        log.warning("model weights not shared between processes (each process holds its own copy): cache %s unusable: %s", cache_dir, e)
        out.update({k: _copy(v) for k, v in large.items()})
        return out
    try:
        _evict(cache_dir, keep=KEEP_MODELS)
    except OSError as e:
        log.warning("could not remove old model cache files in %s: %s", cache_dir, e)
    return out


def _copy(tensor: Tensor) -> Tensor:
    """A tensor of its own: floats as float32, others as they are."""
    return tensor.to(torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)


def _private_folder(cache_dir: Path, source_hash: str) -> Path:
    """``cache_dir/source_hash``, created 0700 if missing; refused if either is not a folder owned
    by this user (or root) and closed to others (another user could change the numbers under our
    mapping)."""
    folder = cache_dir / source_hash
    for path in (cache_dir, folder):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=True)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise CacheUnusable(f"{path} is not a folder")
        if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:  # root's, e.g. written into an image
            raise CacheUnusable(f"{path} belongs to another user or others may write to it")
    return folder


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's lock, held; its time is the folder's last use (for ``_evict``). On a read-only
    filesystem an existing lock file is opened for reading (flock needs no more): a cache written
    beforehand is still mapped; a missing or bad file cannot be written, and the caller falls back."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        fd = os.open(folder / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            os.utime(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _evict(cache_dir: Path, keep: int) -> None:
    """Remove the folders of all but the ``keep`` most recently used weights (each fine-tuned version
    adds one). A folder in use now (its lock held) stays; a process that maps a removed file keeps
    its mapping, and the next process to load those weights writes the file again."""
    folders = []
    for folder in cache_dir.iterdir():
        with contextlib.suppress(OSError):
            if len(folder.name) == 64 and folder.is_dir() and not folder.is_symlink():
                folders.append((os.stat(folder / ".lock").st_mtime_ns, folder))
    for _, folder in sorted(folders, reverse=True)[keep:]:
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            for path in folder.iterdir():
                if path.name != ".lock":
                    path.unlink()
            (folder / ".lock").unlink()
            folder.rmdir()
        finally:
            os.close(fd)


def _header(name: str, shape: tuple[int, ...], source_hash: str) -> bytes:
    text = json.dumps({"magic": MAGIC, "version": VERSION, "source": source_hash, "name": name, "shape": list(shape), "dtype": "float32"})
    return text.encode().ljust(HEADER_BYTES, b" ")


def _mapped(path: Path, name: str, source: Tensor, source_hash: str) -> Tensor:
    """The cache file's tensor if it holds exactly ``source`` as float32; else the file rewritten."""
    shape = tuple(source.shape)
    header = _header(name, shape, source_hash)
    array = _open_valid(path, header, shape, source)
    if array is None:
        if path.exists():
            log.warning("model cache file %s is corrupt or partial; rewriting it", path)
        _write(path, header, source)
        array = _open_valid(path, header, shape, source)
        if array is None:
            raise OSError(f"{path} does not read back as written")
    return torch.from_numpy(array)


def _open_valid(path: Path, header: bytes, shape: tuple[int, ...], source: Tensor) -> np.ndarray | None:
    expected = HEADER_BYTES + 4 * int(np.prod(shape))
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != expected or f.read(HEADER_BYTES) != header:
                return None
    except FileNotFoundError:
        return None
    # "c": copy-on-write (MAP_PRIVATE): shared pages until a process writes, and never written back
    array = np.memmap(path, dtype=np.float32, mode="c", offset=HEADER_BYTES, shape=shape)
    flat_source, flat_array = source.reshape(len(source), -1), array.reshape(len(array), -1)  # (rows, rest)
    for lo in range(0, len(flat_source), _CHUNK_ROWS):
        if not np.array_equal(flat_array[lo : lo + _CHUNK_ROWS], flat_source[lo : lo + _CHUNK_ROWS].float().numpy()):
            return None
    return array


def _write(path: Path, header: bytes, source: Tensor) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            flat = source.reshape(len(source), -1)
            for lo in range(0, len(flat), _CHUNK_ROWS):
                f.write(flat[lo : lo + _CHUNK_ROWS].float().contiguous().numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Loading a model leaves ~30 MB free in the heap (the parsed vocab.json, the float16 tensors):
    memory the process holds but does not use, counted in each worker's share."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        if name is not None:
            ctypes.CDLL(name).malloc_trim(0)
