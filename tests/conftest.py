"""Shared fixtures: tiny models and tokenizers built locally (no hub)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from comal_openrlhf.tiny import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def dpo_jsonl(tmp_path):
    rows = [{"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"} for _ in range(16)]
    return write_jsonl(tmp_path / "dpo.jsonl", rows)
