"""Import the project's packages from this checkout on a machine where the project is not installed.

The scripts of this folder (and the kernel tests, through tests/_kernels.py) run where comal-openrlhf is installed
and where it is not: the lent GPU machine has torch, triton, transformers, numpy and pytest only, and the side
environment of ``scripts/device_compat.sh`` has torch and triton. There ``use_checkout()`` loads ``comal_openrlhf``
and ``comal_openrlhf.kernels`` from this checkout, laid out as pyproject.toml installs them (the folder ``kernels/``
is the package ``comal_openrlhf.kernels``), without putting the checkout's root on sys.path, where ``kernels/``
would shadow the PyPI package of that name. Where the project is installed it only imports it.
"""

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = (("comal_openrlhf", "comal_openrlhf"), ("comal_openrlhf.kernels", "kernels"))  # (package, folder)


def use_checkout():
    """Return the module ``comal_openrlhf.kernels``, the installed one or this checkout's ``kernels/``.

    The package's ``__init__`` runs either way, so on a machine without CUDA it still turns on Triton's
    interpreter before triton is first imported (call this before anything imports triton)."""
    try:
        return importlib.import_module("comal_openrlhf.kernels")
    except ModuleNotFoundError as e:
        if e.name not in ("comal_openrlhf", "comal_openrlhf.kernels"):
            raise  # the package exists but something it imports does not: that is the error to show
    for name, folder in LAYOUT:
        if name in sys.modules:
            continue
        path = os.path.join(REPO, folder)
        init = os.path.join(path, "__init__.py")
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    kernels = sys.modules["comal_openrlhf.kernels"]
    sys.modules["comal_openrlhf"].kernels = kernels
    return kernels
