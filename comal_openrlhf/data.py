"""Iteration sources and the pair dataset: where each COMAL iteration's preference pairs come from.

Data flow of one iteration (COMAL.md section 5): a source yields the iteration's pairs (this module), they are
tokenised with OpenRLHF's ``RewardDataset`` (``PairDataset``), the trainer caches their log-probs under mu_k and the
anchor, then trains. Sources:

- ``offline``: a directory with one file per iteration, ``iter_000.jsonl``, ``iter_001.jsonl``, ... for users who
  sample and judge elsewhere, as the official COMAL pipeline does.
- ``static``: OpenRLHF's ``--data.dataset`` (any file or hub dataset ``blending_datasets`` reads), the same pairs in
  every iteration: an unchanged ``train_dpo`` launch.
- ``online`` (comal_openrlhf.online): sample from the current policy, judge, build pairs.

Rows use OpenRLHF's keys (``--data.prompt_key``, ``--data.chosen_key``, ``--data.rejected_key``) and its prompt
formatting (``--data.input_template``, ``--data.apply_chat_template``). Optional per-row fields: ``chosen_winrate``
and ``rejected_winrate`` (P(y > mu_k), needed by the sppo and rebel losses) and ``soft_label`` (P(chosen beats
rejected), the soft form of the loss). Bad rows never vanish silently: broken JSON or a missing key is an error that
names file and line; empty or non-string responses, chosen == rejected, bad win rates and prompts longer than
``--data.max_len`` are counted skips, the first few logged with file and line.
"""

import glob
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

SKIP_EXAMPLES = 3  # file:line examples logged per skip reason


class DataError(ValueError):
    """A malformed input file: the message names the file and the line."""


@dataclass
class PairRow:
    """One training pair, formatted for the tokenizer (prompt text already templated)."""

    prompt: str
    chosen: str
    rejected: str
    chosen_winrate: float = float("nan")
    rejected_winrate: float = float("nan")
    soft_label: float = 1.0
    origin: str = ""
    weight: float = 1.0  # weight of the pair in the loss's weighted mean (all_soft pairs)


@dataclass
class SkipLog:
    """Counted skips of one iteration, with a few file:line examples per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    truncated: int = 0

    def skip(self, reason, origin):
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < SKIP_EXAMPLES:
            ex.append(origin)

    def total(self):
        return sum(self.counts.values())

    def summary(self):
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items()]
        return "; ".join(parts)

    def as_dict(self):
        return {**{f"skipped_{r.replace(' ', '_')}": n for r, n in self.counts.items()}, "truncated": self.truncated}


def _text_of(value, chat):
    """Response/prompt content for the emptiness check; None when the type is not allowed."""
    if isinstance(value, str):
        return value
    if chat and isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return " ".join(str(m["content"]) for m in value)
    return None


class RowFormatter:
    """Validate one raw row and format it with OpenRLHF's own ``preprocess_data`` (templates, chat template)."""

    def __init__(self, data_args, tokenizer, max_len, need_winrates=False):
        from openrlhf.datasets.reward_dataset import preprocess_data

        self._preprocess = preprocess_data
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.need_winrates = need_winrates
        self.prompt_key = getattr(data_args, "prompt_key", None)
        self.chosen_key = getattr(data_args, "chosen_key", "chosen")
        self.rejected_key = getattr(data_args, "rejected_key", "rejected")
        self.input_template = getattr(data_args, "input_template", None)
        self.chat = bool(getattr(data_args, "apply_chat_template", False))
        if self.chat and getattr(data_args, "tokenizer_chat_template", None):
            tokenizer.chat_template = data_args.tokenizer_chat_template
        self._apply_chat_template = tokenizer.apply_chat_template if self.chat else None

    def _as_messages(self, value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    def __call__(self, row, origin, skips: SkipLog) -> Optional[PairRow]:
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
        keys = [k for k in (self.prompt_key, self.chosen_key, self.rejected_key) if k]
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(
                f"{origin}: missing key(s) {missing}; the row has {sorted(row)} "
                "(set --data.prompt_key / --data.chosen_key / --data.rejected_key)"
            )
        texts = {k: _text_of(row[k], self.chat) for k in keys}
        for k, t in texts.items():
            if t is None:
                skips.skip(f"non-string {k}", origin)
                return None
        if not texts[self.chosen_key].strip() or not texts[self.rejected_key].strip():
            skips.skip("empty response", origin)
            return None
        if row[self.chosen_key] == row[self.rejected_key]:
            skips.skip("chosen == rejected", origin)
            return None
        p_w, p_l = row.get("chosen_winrate"), row.get("rejected_winrate")
        if self.need_winrates and (p_w is None or p_l is None):
            raise DataError(f"{origin}: the sppo/rebel losses need 'chosen_winrate' and 'rejected_winrate' fields")
        soft = row.get("soft_label", 1.0)
        probs = [v for v in (p_w, p_l, soft) if v is not None]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in probs):
            skips.skip("win rate or soft label not a probability", origin)
            return None

        data = dict(row)
        if self.chat and self.prompt_key:
            data[self.prompt_key] = self._as_messages(row[self.prompt_key], "user")
            data[self.chosen_key] = self._as_messages(row[self.chosen_key], "assistant")
            data[self.rejected_key] = self._as_messages(row[self.rejected_key], "assistant")
        prompt, chosen, rejected, _margin = self._preprocess(
            data,
            self.input_template,
            self.prompt_key,
            self.chosen_key,
            self.rejected_key,
            self._apply_chat_template,
            is_dpo=True,
        )
        # RewardDataset drops prompts of >= max_len - 2 tokens without a word: count them here instead
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt >= self.max_len - 2:
            skips.skip(f"prompt longer than --data.max_len {self.max_len}", origin)
            return None
        n_long = max(
            len(self.tokenizer(prompt + r, add_special_tokens=False)["input_ids"]) for r in (chosen, rejected)
        )
        if n_long + 1 > self.max_len:  # +1: the EOS OpenRLHF appends; the response is truncated, not dropped
            skips.truncated += 1
        nan = float("nan")
        return PairRow(
            prompt,
            chosen,
            rejected,
            float(p_w) if p_w is not None else nan,
            float(p_l) if p_l is not None else nan,
            float(soft),
            origin,
        )


def read_jsonl(path):
    """Yield (line_number, row) for each non-blank line; broken JSON is an error naming file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


def load_train_data(args, strategy):
    """``--data.dataset`` through OpenRLHF's ``blending_datasets``, as train_dpo reads it (probabilities, split,
    ``--data.max_samples``)."""
    from openrlhf.datasets.utils import blending_datasets

    data = blending_datasets(
        args.data.dataset,
        args.data.dataset_probs,
        strategy,
        args.train.seed,
        max_count=args.data.max_samples,
        dataset_split=args.data.dataset_split,
    )
    return data.select(range(min(args.data.max_samples, len(data))))


class IterationSource:
    """Yields the preference pairs of iteration k. ``num_iterations`` is None when the source has no limit."""

    name = "base"
    num_iterations: Optional[int] = None

    def pairs(self, k: int, trainer) -> tuple:
        """Return (rows: list[PairRow], stats: dict) for iteration k, identical on every rank."""
        raise NotImplementedError


class OfflineSource(IterationSource):
    """``iter_000.jsonl``, ``iter_001.jsonl``, ... in one directory: file k holds iteration k's pairs."""

    name = "offline"
    PATTERN = re.compile(r"^iter_(\d+)\.jsonl$")

    def __init__(self, directory, formatter: RowFormatter):
        if not os.path.isdir(directory):
            raise DataError(f"--comal.pairs_dir {directory}: no such directory")
        self.directory = directory
        self.formatter = formatter
        found = sorted(int(m.group(1)) for m in map(self.PATTERN.match, os.listdir(directory)) if m)
        if not found:
            raise DataError(f"--comal.pairs_dir {directory}: no iter_NNN.jsonl files")
        if found != list(range(len(found))):
            raise DataError(
                f"--comal.pairs_dir {directory}: files must be iter_000.jsonl .. without gaps, found {found}"
            )
        self.num_iterations = len(found)

    def path(self, k):
        return os.path.join(self.directory, f"iter_{k:03d}.jsonl")

    def pairs(self, k, trainer=None):
        if k >= self.num_iterations:
            raise DataError(
                f"iteration {k} needs {self.path(k)}, but {self.directory} has {self.num_iterations} files"
            )
        path = self.path(k)
        skips = SkipLog()
        rows = [r for r in (self.formatter(row, f"{path}:{i}", skips) for i, row in read_jsonl(path)) if r]
        return rows, {"source": path, "skips": skips}


class StaticSource(IterationSource):
    """OpenRLHF's ``--data.dataset`` (through ``blending_datasets``), the same pairs in every iteration."""

    name = "static"
    num_iterations = 1  # an unchanged train_dpo launch is one iteration; --comal.iterations repeats the pairs

    def __init__(self, args, strategy, formatter: RowFormatter):
        self.label = args.data.dataset
        self.raw = list(load_train_data(args, strategy))
        self.formatter = formatter

    def pairs(self, k, trainer=None):
        skips = SkipLog()
        rows = [
            r for r in (self.formatter(row, f"{self.label}:row {i}", skips) for i, row in enumerate(self.raw)) if r
        ]
        return rows, {"source": self.label, "skips": skips}


def list_iteration_files(directory):
    return sorted(glob.glob(os.path.join(directory, "iter_*.jsonl")))


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs (through OpenRLHF's RewardDataset, is_dpo=True) plus per-pair fields and the pair index.

    Items are RewardDataset's ``(chosen_ids, c_mask, reject_ids, r_mask, prompt_len)`` followed by the index, so the
    trainer can look up the cached log-probs and the win rates of every pair in a batch.
    """

    def __init__(self, rows, tokenizer, max_len):
        import datasets
        from openrlhf.datasets import RewardDataset

        # The rows are already formatted (RowFormatter), so RewardDataset only tokenises: plain keys, no template.
        plain = SimpleNamespace(
            args=SimpleNamespace(
                data=SimpleNamespace(
                    prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False
                )
            )
        )
        table = datasets.Dataset.from_list(
            [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows]
        )
        datasets.disable_progress_bars()
        self.inner = RewardDataset(table, tokenizer, max_len, plain, is_dpo=True, num_processors=1)
        if len(self.inner) != len(rows):  # RowFormatter applies the same length rule, so this cannot differ
            raise RuntimeError(f"RewardDataset kept {len(self.inner)} of {len(rows)} pre-checked pairs")
        self.rows = rows
        self.fields = torch.tensor(
            [[r.chosen_winrate, r.rejected_winrate, r.soft_label, r.weight] for r in rows], dtype=torch.float32
        ).reshape(-1, 4)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return (*self.inner[i], i)

    def collate_fn(self, items):
        batch = self.inner.collate_fn([it[:-1] for it in items])
        return (*batch, torch.tensor([it[-1] for it in items], dtype=torch.long))
