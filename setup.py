"""Build hook: ship ``comal_openrlhf.pth`` at the top of site-packages (wheel and editable installs alike).

The .pth registers a meta-path finder that serves ``openrlhf.cli.train_comal`` from
``comal_openrlhf.cli.train_comal`` (see comal_openrlhf/_alias.py), so ``python -m openrlhf.cli.train_comal``
works without writing into OpenRLHF's directory and survives reinstalling OpenRLHF.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "comal_openrlhf.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the .pth too."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        with open(PTH, encoding="utf-8") as f:
            wheel.writestr(PTH, f.read())


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
