"""Serve ``openrlhf.cli.train_comal`` from this package (imported by ``comal_openrlhf.pth`` at start-up).

OpenRLHF launches entry points as ``python -m openrlhf.cli.X``. The finder below answers only that
one dotted name; it never touches OpenRLHF's files, so reinstalling OpenRLHF leaves it working.
"""

import importlib.abc
import importlib.util
import sys

ALIASES = {"openrlhf.cli.train_comal": "comal_openrlhf.cli.train_comal"}


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        real = ALIASES.get(fullname)
        if real is None:
            return None
        spec = importlib.util.find_spec(real)
        if spec is None:
            return None
        return importlib.util.spec_from_file_location(fullname, spec.origin)


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
