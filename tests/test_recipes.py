"""Every launch line of the recipes in examples/recipes parses with the parser of the program it launches
(train_comal's, evaluate's, generate's, judge's), so no recipe drifts from the flags."""

import glob
import os
import shlex
import subprocess

import pytest
from _util import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "examples", "recipes", "*.sh")))
RECIPES = [r for r in RECIPES if os.path.basename(r) != "common.sh"]


def _parsers():
    from comal_openrlhf.cli import evaluate, generate, judge, train_comal

    return {
        "openrlhf.cli.train_comal": train_comal.parse_args,
        "comal_openrlhf.cli.evaluate": evaluate.parse_args,
        "comal_openrlhf.cli.generate": generate.parse_args,
        "comal_openrlhf.cli.judge": judge.parse_args,
    }


def commands(script):
    """The commands the script would run (DRY_RUN=1 prints them), as (module, argv) pairs."""
    env = {**os.environ, "DRY_RUN": "1", "ITERATIONS": "2"}
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        tokens = shlex.split(line)
        flag = next((i for i, t in enumerate(tokens) if t in ("-m", "--module")), None)
        assert flag is not None, f"{script}: no '-m MODULE' / '--module MODULE' in: {line}"
        out.append((tokens[flag + 1], tokens[flag + 2 :]))
    return out


def test_there_are_recipes():
    names = {os.path.basename(r) for r in RECIPES}
    assert {"comal_llama3_8b.sh", "comal_qwen25_7b.sh", "baselines_llama3_8b.sh", "evaluate_llama3_8b.sh"} <= names


@pytest.mark.parametrize("script", RECIPES, ids=os.path.basename)
def test_recipe_parses(script):
    text = open(script).read()
    for field in ("Hardware:", "Expected time:", "Paper's numbers"):
        assert field in text, f"{script}: header lacks {field!r}"
    parsers = _parsers()
    cmds = commands(script)
    assert cmds, f"{script} runs nothing"
    seen = set()
    for module, argv in cmds:
        assert module in parsers, f"{script}: unknown program {module}"
        key = (module, tuple(argv))
        if key in seen:
            continue
        seen.add(key)
        try:
            parsers[module](argv)
        except SystemExit as e:  # argparse: an unknown or malformed flag
            pytest.fail(f"{script}: {module} rejects its command line ({e}): {' '.join(argv)}")
