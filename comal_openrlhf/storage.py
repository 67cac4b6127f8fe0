"""Writing results so that a failed write is never a silent loss: every file a run or a command promises goes
through here.

- ``write_atomic`` / ``save_torch``: write a temporary file in the target's folder, flush, ``fsync``, rename over the
  target, ``fsync`` the folder. A reader sees the old file or the new one, never half of one.
- ``append_lines``: append whole lines and ``fsync``; a failed append is cut back to the file's previous length, so
  a JSON-lines file never ends in half a record.
- ``publish_dir``: move the files of a finished temporary folder into their final folder, each by one rename, after
  ``check_hf_dir`` has read them back (config, weights headers, tokenizer).
- ``append_lines`` files are read back by ``read_cache`` (after ``repair_tail`` cut a line a killed process left
  half-written) and keyed by ``content_key``, the hash of what produced a value.
- ``guarded(path)``: any write error inside (``OSError``, and the ``RuntimeError`` / safetensors errors that torch and
  safetensors raise for an I/O failure) becomes one ``StorageError`` that names the path and the free space there.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from comal_openrlhf.errors import BadInputError, StorageError


def free_space(path):
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent), as text; '?' if unknown."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "?"


def _is_write_failure(exc):
    if isinstance(exc, OSError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    # torch.save reports a failed write as RuntimeError ("iostream error", "unexpected pos"); safetensors as
    # SafetensorError ("I/O error: No space left on device")
    return any(
        s in text for s in ("iostream error", "unexpected pos", "I/O error", "No space left", "SafetensorError")
    )


@contextlib.contextmanager
def guarded(path, what="write"):
    """Turn a write failure inside the block into ``StorageError`` naming ``path`` and its free space."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - only write failures are converted (``_is_write_failure``)
        if not _is_write_failure(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:200]
        raise StorageError(f"cannot {what} {path}: {reason} ({free_space(path)} free there)") from None


def _fsync_dir(path):
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_from_temp(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    with guarded(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(folder)


def write_atomic(path, data):
    """Replace ``path`` by ``data`` (str or bytes) atomically and durably."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _replace_from_temp(path, lambda f: f.write(raw))


def write_json(path, obj, **kwargs):
    write_atomic(path, json.dumps(obj, **kwargs) + "\n")


def save_torch(obj, path):
    """``torch.save`` to ``path`` atomically and durably."""
    import torch

    _replace_from_temp(path, lambda f: torch.save(obj, f))


def append_lines(path, lines):
    """Append ``lines`` (strings without their newline) to ``path`` and fsync; on failure the file is cut back to its
    previous length and ``StorageError`` is raised."""
    if not lines:
        return
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with guarded(path, "append to"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "ab") as f:
            start = f.tell()
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_model.bin",
                "pytorch_model.bin", "pytorch_model.bin.index.json")  # fmt: skip


def check_hf_dir(path):
    """Read a saved Hugging Face folder back: config.json parses, the weights exist and every safetensors file's
    header reads with its tensors inside the file, a tokenizer config exists. Raises StorageError naming the file."""

    def bad(name, why):
        return StorageError(f"the saved model in {path} is incomplete: {name} {why} ({free_space(path)} free there)")

    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    for name in ("config.json", "tokenizer_config.json"):
        if name not in files:
            raise bad(name, "is missing")
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            raise bad(name, f"does not parse ({e})") from None
    if not files & set(WEIGHT_FILES):
        raise bad("the weights", f"are missing (none of {', '.join(WEIGHT_FILES)})")
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        full = os.path.join(path, name)
        try:
            with open(full, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if os.path.getsize(full) < 8 + n + end:
                raise ValueError(f"{os.path.getsize(full)} bytes, the header needs {8 + n + end}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise bad(name, f"is truncated or unreadable ({e})") from None


def publish_dir(tmp_dir, final_dir):
    """Check the finished folder ``tmp_dir`` (``check_hf_dir``), fsync its files, then move each into ``final_dir``
    (one rename per file, same filesystem) and remove ``tmp_dir``."""
    check_hf_dir(tmp_dir)
    with guarded(final_dir, "publish the model into"):
        for name in sorted(os.listdir(tmp_dir)):
            src = os.path.join(tmp_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp_dir)
        for name in sorted(os.listdir(tmp_dir)):
            os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))
        os.rmdir(tmp_dir)
        _fsync_dir(final_dir)


def check_writable(path, what):
    """Create ``path`` (a folder) if needed and prove a file can be created in it; StorageError naming ``what``
    (the flag) otherwise. Called before any model loads."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".comal-write-check.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise StorageError(
            f"{what} {path} is not writable: {e.strerror or e} ({free_space(path)} free there)"
        ) from None


def content_key(*parts):
    """A 32-hex-digit key of JSON-serialisable ``parts``: what produced a cached value (inputs and settings)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


def repair_tail(path):
    """Cut a final line left half-written by a killed process, so appends start on a fresh line."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_cache(path):
    """The JSON rows of an append-only cache file ([] when absent); a broken line is an error naming file:line."""
    out = []
    if not os.path.exists(path):
        return out
    repair_tail(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInputError(f"{path}:{i}: broken cache line ({e.msg}); delete the file to rebuild it")
    return out
