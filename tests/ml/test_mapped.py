"""The word table mapped from a float32 cache file (ml.mapped): the same tags and scores as a private
copy, the file written once and found by the next load, a corrupt or partial file rewritten, and an
unusable cache folder falling back to a private copy with one warning."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from ml import mapped
from ml.artifact import default_model_path
from ml.predictor import Predictor

SENTENCES = [["Tom", "visited", "Oslo", "."], ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
             ["Peter", "Blackburn"], ["The", "zzyzx", "qwertyuiop", "of", "Nairobi", "grew", "12.5", "%"]]
TABLE = "word_embedding.weight.f32"


def _results(predictor: Predictor) -> list[tuple[list[str], list[float]]]:
    # one by one (the numpy single-sentence path) and batched (the packed torch path)
    single = [predictor.predict([s])[0] for s in SENTENCES]
    batched = predictor.predict(SENTENCES)
    return [(r.tags, r.scores) for r in single + batched]


def _mapped_from(array: np.ndarray) -> str | None:
    """The file whose mapping holds ``array``'s first number, if any (from /proc/self/maps)."""
    address = array.ctypes.data
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else None
    return None


def _table_file(cache: Path) -> Path:
    (found,) = cache.glob(f"*/{TABLE}")
    return found


@pytest.fixture(scope="module")
def private_results() -> list[tuple[list[str], list[float]]]:
    return _results(Predictor.load(default_model_path()))


def test_mapped_table_gives_the_same_tags_and_scores_as_a_private_copy(tmp_path, private_results):
    cache = tmp_path / "not" / "yet" / "there"  # created
    predictor = Predictor.load(default_model_path(), mapped_cache=cache)
    table = _table_file(cache)
    assert table.parent.name == mapped.file_sha256(default_model_path() / "weights.safetensors")
    assert predictor.fast is not None
    assert _mapped_from(predictor.fast.features.words) == str(table), "the fast path's word table is not the mapped file"
    assert _mapped_from(predictor.model.word_embedding.weight.detach().numpy()) == str(table), "the model's word table is not the mapped file"
    assert _results(predictor) == private_results  # exactly: float16 -> float32 is exact either way


def test_the_second_load_maps_the_file_the_first_wrote(tmp_path, private_results):
    Predictor.load(default_model_path(), mapped_cache=tmp_path)
    table = _table_file(tmp_path)
    before = table.stat()
    second = Predictor.load(default_model_path(), mapped_cache=tmp_path)
    after = table.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the cache file was rewritten"
    assert _results(second) == private_results


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "wrong header"])
def test_a_corrupt_or_partial_cache_file_is_rewritten(tmp_path, private_results, damage, caplog):
    Predictor.load(default_model_path(), mapped_cache=tmp_path)
    table = _table_file(tmp_path)
    size = table.stat().st_size
    with open(table, "r+b") as f:
        if damage == "flipped bytes":
            f.seek(size - 1000)
            f.write(b"\x7f" * 8)
        elif damage == "truncated":
            f.truncate(size // 2)
        else:
            f.write(b'{"magic": "something else"')
    with caplog.at_level(logging.WARNING, logger="ml.mapped"):
        predictor = Predictor.load(default_model_path(), mapped_cache=tmp_path)
    assert any("corrupt or partial" in r.getMessage() for r in caplog.records)
    assert table.stat().st_size == size
    assert _results(predictor) == private_results
    assert not [p for p in table.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("problem", ["a file", "writable by others"])
def test_an_unusable_cache_folder_gives_a_private_copy_and_one_warning(tmp_path, private_results, problem, caplog):
    cache = tmp_path / "cache"
    if problem == "a file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        os.chmod(cache, 0o777)  # another user could change the numbers under a mapping
    with caplog.at_level(logging.WARNING, logger="ml.mapped"):
        predictor = Predictor.load(default_model_path(), mapped_cache=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not shared between processes" in warnings[0] and str(cache) in warnings[0], warnings
    assert predictor.fast is not None and _mapped_from(predictor.fast.features.words) is None
    assert _results(predictor) == private_results


def test_small_tensors_stay_private_and_the_default_cache_folder_follows_the_setting(tmp_path, small_model_dir, monkeypatch):
    predictor = Predictor.load(small_model_dir, mapped_cache=tmp_path)  # its word table is far under MIN_BYTES
    assert not list(tmp_path.glob(f"*/{TABLE}"))
    assert predictor.predict([["Tom", "visited", "Oslo"]])[0].tags
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert mapped.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("MODEL_CACHE_DIR", "off")
    assert mapped.default_cache_dir() is None
    monkeypatch.delenv("MODEL_CACHE_DIR")
    default = mapped.default_cache_dir()
    assert default is not None and default.name == f"ner-model-cache-{os.getuid()}"


def test_old_weights_are_evicted_but_not_while_in_use(tmp_path):
    import fcntl

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old = [cache / (c * 64) for c in "abcde"]  # five other weights, a the least recently used
    for age, folder in enumerate(old):
        folder.mkdir(mode=0o700)
        (folder / TABLE).write_bytes(b"x")
        (folder / ".lock").touch()
        os.utime(folder / ".lock", (1_000_000 + age, 1_000_000 + age))
    in_use = os.open(old[1] / ".lock", os.O_RDWR)  # another process loading b's weights right now
    fcntl.flock(in_use, fcntl.LOCK_EX)
    try:
        Predictor.load(default_model_path(), mapped_cache=cache)
    finally:
        os.close(in_use)
    current = mapped.file_sha256(default_model_path() / "weights.safetensors")
    left = sorted(p.name for p in cache.iterdir())
    # kept: the loaded weights and the three most recently used others (c, d, e); b is in use; a goes
    assert left == sorted([current, *(f.name for f in old[1:])]), left
    assert mapped.KEEP_MODELS == 4


_READ_ONLY_LOAD = """
import json, logging, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from ml.artifact import default_model_path
from ml.predictor import Predictor
from tests.ml.test_mapped import _mapped_from, _results
warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("ml.mapped").addHandler(Collect(logging.WARNING))
mapped = Predictor.load(default_model_path(), mapped_cache=Path({cache!r}))
same = _results(mapped) == _results(Predictor.load(default_model_path()))
print(json.dumps({{"mapped_from": _mapped_from(mapped.fast.features.words), "warnings": warnings, "same": same}}))
"""


def _load_on_read_only_mount(source: Path, mount: Path) -> dict:
    """Load the bundled model with its cache under ``mount``: ``source`` bound there read-only, in a
    mount namespace of the subprocess's own (nothing else on the machine sees the mount)."""
    import json
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only mount needs root and unshare")
    script = _READ_ONLY_LOAD.format(root=str(Path(__file__).resolve().parents[2]), cache=str(mount / "cache"))
    mount_read_only = f"mount --bind {source} {mount} && mount -o remount,ro,bind {mount}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount_read_only} && ! touch {mount}/probe"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a read-only folder here: {probe.stderr.strip()[:200]}")
    command = f"{mount_read_only} && exec {sys.executable} -c \"$0\""
    out = subprocess.run(["unshare", "-m", "sh", "-c", command, script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_read_only_filesystem_gives_a_private_copy_and_one_warning(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "mount").mkdir()
    found = _load_on_read_only_mount(tmp_path / "source", tmp_path / "mount")
    assert found["mapped_from"] is None and found["same"]
    assert len(found["warnings"]) == 1 and "not shared between processes" in found["warnings"][0], found["warnings"]


def test_a_cache_written_before_the_filesystem_became_read_only_is_still_mapped(tmp_path):
    (tmp_path / "mount").mkdir()
    Predictor.load(default_model_path(), mapped_cache=tmp_path / "source" / "cache")  # written while writable
    found = _load_on_read_only_mount(tmp_path / "source", tmp_path / "mount")
    assert found["mapped_from"] is not None and found["mapped_from"].startswith(str(tmp_path / "mount" / "cache"))
    assert found["same"] and found["warnings"] == []
