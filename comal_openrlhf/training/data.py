"""Iteration sources and the pair dataset: where each COMAL iteration's preference pairs come from.

One iteration of COMAL (arXiv 2410.23223) needs pairs (y_w, y_l) of responses to prompts x. A source
yields them as ``comal_openrlhf.core.pairs.Pair`` (``IterationSource.pairs(k, policy)``); ``PairDataset`` tokenises
them with OpenRLHF's ``RewardDataset`` (openrlhf/datasets/reward_dataset.py). Sources:

- ``offline``: a directory with one file per iteration, ``iter_000.jsonl``, ``iter_001.jsonl``, ... for users who
  sample and judge elsewhere (the official COMAL pipeline; ``python -m comal_openrlhf.cli.judge`` writes this format).
- ``static``: OpenRLHF's ``--data.dataset`` (any file or hub dataset ``blending_datasets`` reads), the same pairs in
  every iteration: an unchanged ``train_dpo`` launch.
- ``online`` (comal_openrlhf.training.online): sample from the current policy, judge, build pairs.

Rows use OpenRLHF's keys (``--data.prompt_key``, ``--data.chosen_key``, ``--data.rejected_key``) and its prompt
formatting (``--data.input_template``, ``--data.apply_chat_template``). Optional per-row fields: ``chosen_winrate``
and ``rejected_winrate`` (P(y > mu_k), needed by the sppo and rebel losses), ``soft_label`` (P(chosen beats
rejected), the soft form of the loss) and ``weight`` (the pair's weight in the prox loss's expectation). Bad rows
never vanish silently: broken JSON, bytes that are not UTF-8 or a missing key are errors naming file and line;
empty or non-string responses, chosen == rejected, bad win rates, over-long lines and prompts longer than
``--data.max_len`` are counted skips, the first few logged with file and line.
"""

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
from openrlhf.datasets import RewardDataset
from openrlhf.datasets.reward_dataset import preprocess_data
from openrlhf.datasets.utils import blending_datasets

from comal_openrlhf.core.pairs import EMPTY, Pair
from comal_openrlhf.errors import BadInputError, DataError, PlanError

SKIP_EXAMPLES = 3  # file:line examples logged per skip reason


# A token is rarely longer than this many bytes: a line over max_len * MAX_BYTES_PER_TOKEN bytes cannot fit in
# --data.max_len tokens however it is split, so it is skipped unparsed instead of costing memory and minutes.
MAX_BYTES_PER_TOKEN = 64


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


def _number(value):
    """A finite JSON number as float (booleans are not numbers here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _probability(value):
    value = _number(value)
    return value if value is not None and 0.0 <= value <= 1.0 else None


def _positive(value):
    value = _number(value)
    return value if value is not None and value > 0 else None


class PromptFormatter:
    """The prompt as the policy sees it and as the judge sees it, with OpenRLHF's data flags.

    ``policy_text``: the tokenizer's chat template with the generation prompt (``--data.apply_chat_template``,
    ``--data.tokenizer_chat_template``), else ``--data.input_template``, else the raw text, as OpenRLHF's
    PromptDataset formats prompts (openrlhf/datasets/prompts_dataset.py). ``judge_text``: the user's text (the last
    user message of a chat).
    """

    def __init__(self, data_args, tokenizer):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(data_args, "apply_chat_template", False))
        self.input_template = getattr(data_args, "input_template", None)
        if self.chat and getattr(data_args, "tokenizer_chat_template", None):
            tokenizer.chat_template = data_args.tokenizer_chat_template

    def policy_text(self, raw):
        if self.chat:
            messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.input_template:
            return self.input_template.format(raw)
        return raw

    @staticmethod
    def judge_text(raw):
        if isinstance(raw, str):
            return raw
        return next((m["content"] for m in reversed(raw) if m.get("role") == "user"), str(raw))


class RowFormatter:
    """Validate one raw pair row and format it with OpenRLHF's own ``preprocess_data`` (templates, chat template)."""

    def __init__(self, data_args, tokenizer, max_len, need_winrates=False):
        self._preprocess = preprocess_data
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.max_chars = max_len * MAX_BYTES_PER_TOKEN
        self.need_winrates = need_winrates
        self.prompt_key = getattr(data_args, "prompt_key", None)
        self.chosen_key = getattr(data_args, "chosen_key", "chosen")
        self.rejected_key = getattr(data_args, "rejected_key", "rejected")
        self.input_template = getattr(data_args, "input_template", None)
        self.chat = bool(getattr(data_args, "apply_chat_template", False))
        if self.chat and getattr(data_args, "tokenizer_chat_template", None):
            tokenizer.chat_template = data_args.tokenizer_chat_template
        self._apply_chat_template = tokenizer.apply_chat_template if self.chat else None

    def keys(self):
        return [k for k in (self.prompt_key, self.chosen_key, self.rejected_key) if k]

    def check_keys(self, row, origin):
        """Errors that stop the run (they say the file is not in the expected format): not an object, missing key."""
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
        # a key a tabular dataset lacks in some rows reads as None there: the same error as a missing key
        missing = [k for k in self.keys() if row.get(k) is None]
        if missing:
            present = sorted(k for k, v in row.items() if v is not None)
            raise DataError(
                f"{origin}: missing key(s) {missing}; the row has {present} "
                "(set --data.prompt_key / --data.chosen_key / --data.rejected_key)"
            )
        if self.need_winrates and (row.get("chosen_winrate") is None or row.get("rejected_winrate") is None):
            raise DataError(f"{origin}: the sppo/rebel losses need 'chosen_winrate' and 'rejected_winrate' fields")

    def _as_messages(self, value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    def _n_tokens(self, text):
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, row, origin, skips: SkipLog) -> Optional[Pair]:
        self.check_keys(row, origin)
        texts = {k: _text_of(row[k], self.chat) for k in self.keys()}
        for k, t in texts.items():
            if t is None:
                skips.skip(f"non-string {k}", origin)
                return None
        if not texts[self.chosen_key].strip():  # a preferred empty answer is a data error, not a response to learn
            skips.skip("empty response", origin)
            return None
        if row[self.chosen_key] == row[self.rejected_key]:
            skips.skip("chosen == rejected", origin)
            return None
        probs = {}
        for name in ("chosen_winrate", "rejected_winrate", "soft_label"):
            if row.get(name) is not None:
                probs[name] = _probability(row[name])
                if probs[name] is None:
                    skips.skip("win rate or soft label not a probability", origin)
                    return None
        weight = _positive(row.get("weight", 1.0))
        if weight is None:
            skips.skip("weight not a positive number", origin)
            return None
        if self.prompt_key and len(texts[self.prompt_key]) > self.max_chars:
            skips.skip(f"prompt longer than --data.max_len {self.max_len}", origin)
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
        if self._n_tokens(prompt) >= self.max_len - 2:
            skips.skip(f"prompt longer than --data.max_len {self.max_len}", origin)
            return None
        # responses are truncated to --data.max_len by RewardDataset; cut absurdly long ones to a length that is
        # still over max_len tokens, so they cost their share of max_len and no more
        long = [r for r in (chosen, rejected) if len(r) > self.max_chars]
        chosen, rejected = chosen[: self.max_chars], rejected[: self.max_chars]
        if not rejected.strip():  # the policy stopped at once: a response, and it lost (core.pairs.EMPTY)
            rejected = EMPTY
        if long or max(self._n_tokens(prompt + r) for r in (chosen, rejected)) + 1 > self.max_len:
            skips.truncated += 1  # +1: the EOS OpenRLHF appends; the response is truncated, not dropped
        return Pair(
            prompt,
            chosen,
            rejected,
            chosen_winrate=probs.get("chosen_winrate", math.nan),
            rejected_winrate=probs.get("rejected_winrate", math.nan),
            soft_label=probs.get("soft_label", math.nan),
            weight=float(weight),
            origin=origin,
        )


def read_jsonl(path, max_line_bytes=None, skips: Optional[SkipLog] = None):
    """Yield (line_number, row) for each non-blank line, reading one line at a time.

    Broken JSON and bytes that are not UTF-8 are errors naming file:line. With ``max_line_bytes`` a longer line is
    skipped without being decoded or parsed (counted in ``skips`` as an over-long line).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if max_line_bytes is not None and len(raw) > max_line_bytes:
                if skips is None:
                    raise DataError(f"{path}:{i}: line of {len(raw)} bytes is over the limit of {max_line_bytes}")
                skips.skip(f"line over {max_line_bytes} bytes", f"{path}:{i}")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


def check_dataset_spec(spec, flag):
    """Before anything loads: each comma-separated entry of a ``blending_datasets`` spec that names a local file
    (OpenRLHF's data-file extensions, or a path that starts with / or .) must exist and hold at least one row;
    hub names are left to the loader. BadInputError naming the flag and the file otherwise."""
    for entry in str(spec).split(","):
        name = entry.split("@")[0].strip()
        if not name:
            raise BadInputError(f"{flag} {spec!r}: an empty dataset name")
        local = name.lower().endswith(DATA_FILE_EXTENSIONS) or name.startswith(("/", "./", "../", "~"))
        if not local:
            continue
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise BadInputError(f"{flag} {name}: no such file or folder")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if not head.strip(b" \t\r\n\xef\xbb\xbf"):
                raise BadInputError(f"{flag} {name}: the file is empty (no rows)")


def load_dataset_or_error(spec, flag, load):
    """``load()`` (a ``blending_datasets`` call on ``spec``) with the loader's failures as one BadInputError naming
    the flag: a missing file, an empty one (the datasets library raises a bare StopIteration), a hub name that
    cannot be reached, a file it cannot parse."""
    check_dataset_spec(spec, flag)
    try:
        return load()
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{flag} {spec}: cannot load it ({type(e).__name__}: {reason})") from None
    except Exception as e:  # datasets' own DatasetGenerationError and friends  # noqa: BLE001
        if type(e).__module__.split(".")[0] not in ("datasets", "pyarrow", "huggingface_hub"):
            raise
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{flag} {spec}: cannot load it ({type(e).__name__}: {reason})") from None


def load_train_data(args, strategy):
    """``--data.dataset`` through OpenRLHF's ``blending_datasets``, as train_dpo reads it (probabilities, split,
    ``--data.max_samples``)."""
    return _blend(args.data, strategy, args.train.seed)


def _blend(d, strategy, seed, flag="--data.dataset"):
    def load():
        return blending_datasets(
            d.dataset, d.dataset_probs, strategy, seed, max_count=d.max_samples, dataset_split=d.dataset_split
        )

    data = load_dataset_or_error(d.dataset, flag, load)
    return data.select(range(min(d.max_samples, len(data))))


def load_prompts(data_args, strategy, seed, flag="--data.dataset"):
    """The raw prompts of ``--data.dataset`` under ``--data.prompt_key`` as (origin, prompt) pairs, plus the SkipLog
    of empty prompts (counted, not kept). A row without the key (or null there: a tabular dataset fills a key some
    rows lack with None) is an error naming the row (1-based), the rule of the pair sources too."""
    d = data_args
    if not d.dataset:
        raise BadInputError(f"prompts needed: {flag}")
    if not d.prompt_key:
        raise BadInputError("prompts need --data.prompt_key (the prompt column)")
    data = _blend(d, strategy, seed, flag)
    prompts, skips = [], SkipLog()
    for i, row in enumerate(data):
        origin = f"{d.dataset}:row {i + 1}"
        if row.get(d.prompt_key) is None:
            present = sorted(k for k, v in row.items() if v is not None)
            raise BadInputError(f"{origin}: missing prompt key {d.prompt_key!r}; the row has {present}")
        raw = row[d.prompt_key]
        if isinstance(raw, str) and not raw.strip():
            skips.skip("empty prompt", origin)
            continue
        prompts.append((origin, raw))
    return prompts, skips


def fitting_prompts(prompts, formatter, tokenizer, max_len, skips):
    """The prompts that leave room for a response: [(i, raw, text)] for each (origin, raw) of ``prompts`` whose
    policy text (``formatter.policy_text``) is shorter than ``max_len - 2`` tokens; the others are counted in
    ``skips`` under their origin. The online source and the generate command filter with it."""
    kept = []
    for i, (origin, raw) in enumerate(prompts):
        text = formatter.policy_text(raw)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_len - 2:
            skips.skip(f"prompt longer than --data.max_len {max_len}", origin)
            continue
        kept.append((i, raw, text))
    return kept


def prompt_window(n_prompts, k, per_iteration):
    """Positions of iteration k's prompts: a window of ``per_iteration`` (at most all of them) starting at k times
    its size, cycling over the list. The online source and ``generate --iteration`` take the same windows."""
    n = min(per_iteration, n_prompts)
    start = (k * n) % n_prompts
    return [(start + i) % n_prompts for i in range(n)]


class IterationSource:
    """Yields the preference pairs of iteration k. ``num_iterations`` is None when the source has no limit."""

    name = "base"
    num_iterations: Optional[int] = None
    allow_empty = False  # True: an iteration without pairs is logged and skipped instead of an error

    def validate(self, iterations: int) -> None:
        """Check, before the first training step, that the source can serve ``iterations`` iterations."""

    def describe(self) -> str:
        return self.name

    def state_dict(self):
        """What a checkpoint must keep for the next iteration's pairs (the optimistic preset's previous samples);
        None when nothing."""
        return None

    def load_state_dict(self, state) -> None:
        """Restore ``state_dict``'s value on resume (None: a checkpoint without source state)."""

    def pairs(self, k: int, policy) -> tuple:
        """Return (pairs: list[Pair], stats: dict) for iteration k, identical on every rank. ``policy`` is the
        OpenRLHF Actor being trained (mu_k at this point); only sampling sources read it."""
        raise NotImplementedError


class OfflineSource(IterationSource):
    """``iter_000.jsonl``, ``iter_001.jsonl``, ... in one directory: file k holds iteration k's pairs."""

    name = "offline"
    PATTERN = re.compile(r"^iter_(\d+)\.jsonl$")

    def __init__(self, directory, formatter: RowFormatter, flag="--comal.pairs_dir"):
        if not os.path.isdir(directory):
            raise DataError(f"{flag} {directory}: no such directory")
        self.directory = directory
        self.formatter = formatter
        self.flag = flag
        found = sorted(int(m.group(1)) for m in map(self.PATTERN.match, os.listdir(directory)) if m)
        if not found:
            raise DataError(f"{flag} {directory}: no iter_NNN.jsonl files")
        if found != list(range(len(found))):
            raise DataError(f"{flag} {directory}: files must be iter_000.jsonl .. without gaps, found {found}")
        self.num_iterations = len(found)

    def describe(self):
        return f"offline ({self.directory}, {self.num_iterations} files)"

    def path(self, k):
        return os.path.join(self.directory, f"iter_{k:03d}.jsonl")

    def validate(self, iterations):
        """Every file the plan needs exists, is UTF-8 JSON lines with the keys, and holds at least one row: found
        before training, not after hours of it."""
        if iterations > self.num_iterations:
            raise PlanError(
                f"--comal.iterations {iterations} needs {iterations} files, but {self.flag} {self.directory} "
                f"has {self.num_iterations} (iter_000.jsonl .. iter_{self.num_iterations - 1:03d}.jsonl)"
            )
        limit = self.formatter.max_chars
        for k in range(iterations):
            path = self.path(k)
            rows = 0
            for i, row in read_jsonl(path, max_line_bytes=limit, skips=SkipLog()):
                self.formatter.check_keys(row, f"{path}:{i}")
                rows += 1
            if rows == 0:
                raise DataError(f"{path}: no pairs (the file has no JSON rows within the length limit)")

    def pairs(self, k, policy=None):
        if k >= self.num_iterations:
            raise PlanError(
                f"iteration {k} needs {self.path(k)}, but {self.directory} has {self.num_iterations} files"
            )
        path = self.path(k)
        skips = SkipLog()
        pairs = [
            p
            for p in (
                self.formatter(row, f"{path}:{i}", skips)
                for i, row in read_jsonl(path, max_line_bytes=self.formatter.max_chars, skips=skips)
            )
            if p
        ]
        return pairs, {"source": path, "skips": skips}


class FixedPairs(IterationSource):
    """The same already formatted pairs in every iteration (the held-out pairs of a static source)."""

    name = "fixed"

    def __init__(self, pairs, label):
        self._pairs, self.label = list(pairs), label

    def describe(self):
        return f"fixed ({self.label}, {len(self._pairs)} pairs)"

    def pairs(self, k, policy=None):
        return list(self._pairs), {"source": self.label}


class StaticSource(IterationSource):
    """OpenRLHF's ``--data.dataset`` (through ``blending_datasets``), the same pairs in every iteration."""

    name = "static"
    num_iterations = 1  # an unchanged train_dpo launch is one iteration; --comal.iterations repeats the pairs

    def __init__(self, args, strategy, formatter: RowFormatter):
        self.label = args.data.dataset
        self.raw = list(load_train_data(args, strategy))
        self.formatter = formatter
        self._pairs = None

    def describe(self):
        return f"static ({self.label})"

    def validate(self, iterations):
        for i, row in enumerate(self.raw):
            self.formatter.check_keys(row, f"{self.label}:row {i + 1}")

    def pairs(self, k, policy=None):
        if self._pairs is None:  # the same pairs every iteration: format once
            skips = SkipLog()
            rows = (self.formatter(row, f"{self.label}:row {i + 1}", skips) for i, row in enumerate(self.raw))
            self._pairs = ([p for p in rows if p], skips)
        pairs, skips = self._pairs
        return list(pairs), {"source": self.label, "skips": skips}


class _Rows:
    """The few methods of ``datasets.Dataset`` that RewardDataset's constructor calls (``column_names``, ``map``,
    ``filter``, column access), on a list of dicts in memory.

    An iteration's pairs are a few hundred to a few thousand rows, formatted and length-checked already; the Arrow
    table, fingerprinting and cache files of ``datasets`` cost about 0.2 s per iteration on 2 CPU cores for nothing
    (the demo's iterations take about 1 s). RewardDataset's own ``process_data`` still runs on every row.
    """

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def map(self, fn, remove_columns=(), num_proc=None):
        return _Rows([fn(row) for row in self.rows])

    def filter(self, keep):
        return _Rows([row for row in self.rows if keep(row)])

    def __getitem__(self, column):
        return [row[column] for row in self.rows]


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs (through OpenRLHF's RewardDataset, is_dpo=True) and the pair index.

    Items are RewardDataset's ``(chosen_ids, c_mask, reject_ids, r_mask, prompt_len)`` followed by the index of the
    pair in the iteration, through which the trainer reads the pair's entries of the iteration record. Each item is
    tokenised once and kept: the trainer makes ``--train.max_epochs`` passes (30 in the demo) over the same pairs,
    and RewardDataset tokenises on every access. The collate function pads copies, so a kept item is never changed.
    """

    def __init__(self, pairs, tokenizer, max_len):
        # The pairs are already formatted (RowFormatter), so RewardDataset only tokenises: plain keys, no template.
        plain = SimpleNamespace(
            args=SimpleNamespace(
                data=SimpleNamespace(
                    prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False
                )
            )
        )
        table = _Rows([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
        self.tokenizer, self.prompts = tokenizer, [p.prompt for p in pairs]
        self.empty = [(p.chosen == EMPTY, p.rejected == EMPTY) for p in pairs]
        self.inner = RewardDataset(table, tokenizer, max_len, plain, is_dpo=True, num_processors=1)
        if len(self.inner) != len(pairs):  # RowFormatter applies the same length rule, so this cannot differ
            raise RuntimeError(f"RewardDataset kept {len(self.inner)} of {len(pairs)} pre-checked pairs")
        self._items = [None] * len(pairs)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self._items[i] is None:
            item = list(self.inner[i])
            for side in (0, 2):  # chosen, rejected
                if self.empty[i][side // 2]:
                    item[side], item[side + 1] = self._prompt_then_eos(i)
            self._items[i] = (*item, i)
        return self._items[i]

    def _prompt_then_eos(self, i):
        """The empty response: the prompt's own tokens, then EOS. RewardDataset would strip the prompt's trailing
        newline (it strips the joined text), so a prompt ending in one would lose a token and the response mask,
        which starts at the prompt's length, would cover nothing: log pi(empty) would read 0."""
        ids = self.tokenizer(self.prompts[i], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        ids = torch.tensor([ids], dtype=torch.long)
        return ids, torch.ones_like(ids)

    def collate_fn(self, items):
        batch = self.inner.collate_fn([it[:-1] for it in items])
        return (*batch, torch.tensor([it[-1] for it in items], dtype=torch.long))
