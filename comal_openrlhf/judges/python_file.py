"""A judge written by the user as a Python file defining::

    def judge(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        ...  # P(responses_a[i] beats responses_b[i] | prompts[i])

Loading the file runs arbitrary code, so it is refused unless the caller opts in (``--judge.allow_python_code``).
Outputs are checked like every judge's: non-finite values, values outside [0, 1] or a wrong length raise a
JudgeError naming the file.
"""

import importlib.util
import os

from comal_openrlhf.core.judging import Judge, JudgeError


class PythonJudge(Judge):
    def __init__(self, path, allow_python_code=False):
        if not allow_python_code:
            raise JudgeError(f"python judge {path!r} would run user code: refusing without --judge.allow_python_code")
        if not path or not os.path.isfile(path):
            raise JudgeError(f"python judge file {path!r} does not exist")
        self.name = f"python:{path}"
        spec = importlib.util.spec_from_file_location(f"comal_user_judge_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise JudgeError(f"python judge {path!r} failed to load: {type(e).__name__}: {e}") from e
        self.fn = getattr(module, "judge", None)
        if not callable(self.fn):
            raise JudgeError(f"python judge {path!r} defines no function judge(prompts, responses_a, responses_b)")

    def _prob(self, prompts, a, b):
        try:
            return self.fn(prompts, a, b)
        except Exception as e:
            raise JudgeError(f"judge {self.name!r} raised {type(e).__name__}: {e}") from e
