"""Smoke test of benchmarks/judges.py at toy sizes: the forwards each judge runs for all pairs of n samples."""

import argparse
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration  # builds three models and times them: several seconds
def test_bench_judges_counts_forwards():
    spec = importlib.util.spec_from_file_location("bench_judges", os.path.join(REPO, "benchmarks", "judges.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(
        n="3,5", prompts=1, repeats=1, hidden=32, layers=1, words=4, batch_size=4, threads=1, seed=0, json=False
    )
    report = bench.run(args)
    got = {(r["judge"], r["n"]): r["forwards_per_prompt"] for r in report["results"]}
    # pairwise_lm: one forward per ordered pair; gpm and reward_model: one per response
    assert got == {
        ("gpm", 3): 3,
        ("pairwise_lm", 3): 6,
        ("reward_model", 3): 3,
        ("gpm", 5): 5,
        ("pairwise_lm", 5): 20,
        ("reward_model", 5): 5,
    }
    assert all(r["seconds_per_prompt"] > 0 for r in report["results"])
    assert {r["ratio_to_pairwise_lm"] for r in report["results"] if r["judge"] == "pairwise_lm"} == {1.0}
