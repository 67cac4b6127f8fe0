"""Library code raises typed errors and never exits the interpreter; only command-line ``main`` functions do."""

import ast
import os
from types import SimpleNamespace

import pytest
from _util import REPO

from comal_openrlhf.errors import COMALError, DataError, JudgeError, PlanError

ENTRY_POINTS = {"main", "_main", "run_command"}  # command-line functions (and _cli.run_command, the body they share)
# may turn an error into an exit status


def _library_files():
    for root in ("comal_openrlhf", "kernels"):
        for dirpath, _dirs, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_no_sys_exit_outside_command_line_entry_points():
    offenders = []
    for path in _library_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        # walk with the enclosing function's name
        stack = [(tree, None)]
        while stack:
            node, func = stack.pop()
            for child in ast.iter_child_nodes(node):
                f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
                if isinstance(child, ast.If) and "__name__" in ast.unparse(child.test):
                    continue  # the `if __name__ == "__main__":` block is the command line
                exits = (
                    isinstance(child, ast.Raise) and child.exc is not None and "SystemExit" in ast.unparse(child.exc)
                )
                exits |= isinstance(child, ast.Call) and ast.unparse(child.func) in ("sys.exit", "exit", "quit")
                if exits and f not in ENTRY_POINTS:
                    offenders.append(f"{os.path.relpath(path, REPO)}:{child.lineno} in {f}()")
                stack.append((child, f))
    assert not offenders, "library code exits the interpreter: " + ", ".join(offenders)


def test_library_calls_raise_typed_errors():
    from comal_openrlhf import cpu_runtime
    from comal_openrlhf.core.schedule import resolve_plan
    from comal_openrlhf.judges import build_judge
    from comal_openrlhf.training.data import OfflineSource

    with pytest.raises(PlanError):
        resolve_plan("comal", beta=float("inf"))
    with pytest.raises(DataError):
        OfflineSource("/nonexistent/pairs", formatter=None)
    with pytest.raises(JudgeError):
        build_judge({"kind": "table"})
    args = SimpleNamespace(ds=SimpleNamespace(packing_samples=True))
    with pytest.raises(PlanError, match="packing_samples"):
        cpu_runtime.adapt_args(args)
    assert issubclass(PlanError, COMALError) and issubclass(DataError, COMALError)
