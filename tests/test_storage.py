"""storage: atomic writes, appends cut back on failure, read-back checks and write failures as one StorageError."""

import json
import os
import subprocess

import pytest

from comal_openrlhf import storage
from comal_openrlhf.errors import StorageError


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (root only): a real full disk, not a mock."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk cases need a real small filesystem")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    storage.write_json(p, {"x": 1})
    storage.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(tmp_path) == ["a.json"]


def test_full_disk_keeps_the_old_file_and_names_path_and_free_space(tiny_fs):
    p = tiny_fs / "state.json"
    storage.write_json(p, {"ok": True})
    with pytest.raises(StorageError, match=r"cannot write .*state\.json: No space left on device \(.* free there\)"):
        storage.write_atomic(p, b"x" * (1 << 20))
    assert json.loads(p.read_text()) == {"ok": True}  # the reader still sees the old file
    assert os.listdir(tiny_fs) == ["state.json"]  # the temporary file is gone


def test_failed_append_is_cut_back_to_whole_lines(tiny_fs):
    p = tiny_fs / "history.jsonl"
    storage.append_lines(p, [json.dumps({"iteration": 0})])
    with pytest.raises(StorageError, match="cannot append to"):
        storage.append_lines(p, [json.dumps({"iteration": 1, "pad": "y" * (1 << 20)})])
    assert [json.loads(line) for line in p.read_text().splitlines()] == [{"iteration": 0}]


def test_torch_save_failure_is_a_storage_error(tiny_fs):
    torch = pytest.importorskip("torch")
    with pytest.raises(StorageError, match="model.pt"):
        storage.save_torch({"w": torch.zeros(1 << 18)}, tiny_fs / "model.pt")
    assert os.listdir(tiny_fs) == []


def test_other_errors_pass_through_guarded(tmp_path):
    with pytest.raises(ValueError, match="not a write"):
        with storage.guarded(tmp_path):
            raise ValueError("not a write")


def test_check_hf_dir_finds_a_truncated_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    for name in ("config.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    safetensors.save_file({"w": torch.zeros(64)}, str(tmp_path / "model.safetensors"))
    storage.check_hf_dir(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 8)
    with pytest.raises(StorageError, match="model.safetensors is truncated"):
        storage.check_hf_dir(tmp_path)
    os.remove(tmp_path / "tokenizer_config.json")
    with pytest.raises(StorageError, match="tokenizer_config.json is missing"):
        storage.check_hf_dir(tmp_path)


def test_publish_dir_moves_a_checked_folder(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    tmp, final = tmp_path / ".final.partial", tmp_path / "final"
    tmp.mkdir()
    final.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (tmp / name).write_text("{}")
    safetensors.save_file({"w": torch.zeros(4)}, str(tmp / "model.safetensors"))
    storage.publish_dir(tmp, final)
    assert not tmp.exists() and sorted(os.listdir(final)) == [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]


def test_check_writable_names_the_flag(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            # root ignores the mode bits; a read-only bind mount is the honest check then
            if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode:
                pytest.skip("cannot make a read-only folder as root here")
            try:
                with pytest.raises(StorageError, match=r"--ckpt.path .*ro is not writable: Read-only file system"):
                    storage.check_writable(str(ro), "--ckpt.path")
            finally:
                subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            with pytest.raises(StorageError, match=r"--ckpt.path .*ro is not writable"):
                storage.check_writable(str(ro), "--ckpt.path")
    finally:
        ro.chmod(0o700)
