"""Launch names survive a regular (non-editable) install and never live in OpenRLHF's own directory."""

import glob
import os
import subprocess
import sys
import sysconfig
import venv

from _util import REPO, run_cmd


def test_openrlhf_directory_is_untouched():
    import openrlhf.cli

    assert not os.path.exists(os.path.join(os.path.dirname(openrlhf.cli.__file__), "train_comal.py"))


def test_wheel_install_serves_openrlhf_cli_train_comal(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q"]
    build += ["-w", str(tmp_path)]
    run_cmd(build, cwd=str(tmp_path), timeout=300)
    (wheel,) = glob.glob(str(tmp_path / "comal_openrlhf-*.whl"))
    # A fresh venv that sees this environment's dependencies (OpenRLHF, torch, ...) as a plain path entry: .pth
    # files there are not processed, so the editable install of the checkout is invisible; only the wheel counts.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = glob.glob(str(env_dir / "lib" / "python3*" / "site-packages"))[0]
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run_cmd([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], cwd=str(tmp_path))
    python = str(env_dir / "bin" / "python")
    probe = subprocess.run(
        [python, "-c", "import comal_openrlhf, sys; print(comal_openrlhf.__file__)"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.startswith(site), probe.stdout + probe.stderr
    p = run_cmd([python, "-m", "openrlhf.cli.train_comal", "--help"], cwd=str(tmp_path))
    assert "--comal.algo" in p.stdout and "--model.beta" in p.stdout
