"""A General Preference representation Model (GPM; Zhang et al., arXiv 2410.02197) as the judge.

Checkpoint layout, as the authors save it (the base transformer's weights under its usual prefix, plus the heads in
the same weight files; e.g. general-preference/GPM-Llama-3.1-8B, GPM-Gemma-2B):

- ``value_head.weight``  [2k, hidden]  (linear, no bias): the response embedding
- ``prompt_head.weight`` [k, hidden]   (linear, no bias; optional): the prompt's block weights

Text, tokens and hidden states follow the authors' published usage example (gpm_example_usage.py in
github.com/general-preference/general-preference-model): the tokenizer's chat template over
[user: prompt, assistant: response] (plain prompt + response when the tokenizer has no template), tokenized with the
tokenizer's defaults, left padded, truncated on the right to ``max_len``, and the last token overwritten with EOS;
position ids count real tokens only. With h the last layer's hidden states:

    v_y  = value_head(h[last token]) / ||value_head(h[last token])||_2             (a unit vector in R^{2k})
    w_x  = softmax(prompt_head(h[last token of the prompt]))                       (k block weights; all 1 without
                                                                                    a prompt head)
    R_x  = blockdiag([[0, -w_1], [w_1, 0]], ..., [[0, -w_k], [w_k, 0]])            (skew-symmetric)
    s(y, y' | x) = v_y^T R_x^T v_y' = sum_i w_i (v_y[2i] v_y'[2i+1] - v_y[2i+1] v_y'[2i])
    P(y beats y' | x) = sigmoid(s(y, y' | x) / tau)                                 (tau = --judge.temperature)

The orientation is the authors' (their score is ``chosen @ R^T @ rejected``, positive when the first response is
preferred). "The last token of the prompt" is the prompt's own chat-template rendering [user: prompt] measured in
tokens, inside the full sequence; under causal attention its hidden state does not depend on the response, so each
prompt's R_x is taken once per call (from the first of its responses) and every pair of that prompt uses it.

Since R_x is skew-symmetric, s(y, y') = -s(y', y) term by term: P(a beats b) + P(b beats a) = 1 and
P(a beats a) = 1/2 up to one rounding (``antisymmetric = True``: ``judge_pairs`` asks one order only). With k = 1 and
three responses at 0, 120 and 240 degrees the preference is a cycle (``build_cyclic_gpm``), which no reward model
can represent. Each distinct (prompt, response) is embedded by one forward; all n(n-1) ordered pairs of n responses
then cost n forwards and n(n-1) k-term sums (``forwards`` counts the sequences embedded).
"""

import glob
import json
import os

import numpy as np

from .base import Judge, JudgeError
from .remote import sigmoid
from .reward_model import resolve_device

DEFAULT_TEMPERATURE = 0.1  # the authors' tau
DEFAULT_MAX_LEN = 4096  # the authors' max_length


def read_heads(path):
    """(value_head [2k, H], prompt_head [k, H] or None) as float64 numpy arrays from the checkpoint at ``path``.

    Reads only these two tensors: from the safetensors files (through the index when sharded), else from
    ``pytorch_model*.bin``.
    """
    if not path or not os.path.isdir(path):
        raise JudgeError(f"gpm judge needs --judge.path, a checkpoint directory; got {path!r}")
    names = ("value_head.weight", "prompt_head.weight")
    found = {}
    st_files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            where = json.load(f).get("weight_map", {})
        st_files = sorted({os.path.join(path, where[n]) for n in names if n in where}) or st_files
    if st_files:
        from safetensors import safe_open

        for file in st_files:
            with safe_open(file, framework="pt") as f:
                for n in names:
                    if n in f.keys():
                        found[n] = f.get_tensor(n)
    else:
        import torch

        for file in sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
            sd = torch.load(file, map_location="cpu", weights_only=True)
            found.update({n: sd[n] for n in names if n in sd})
    if "value_head.weight" not in found:
        raise JudgeError(
            f"gpm judge: {path} has no 'value_head.weight' (a GPM checkpoint holds the base model plus value_head "
            "and, optionally, prompt_head weights)"
        )
    value = found["value_head.weight"].double().numpy()
    prompt = found["prompt_head.weight"].double().numpy() if "prompt_head.weight" in found else None
    if value.ndim != 2 or value.shape[0] < 2 or value.shape[0] % 2:
        raise JudgeError(f"gpm judge: {path}: value_head.weight has shape {list(value.shape)}, need [2k, hidden]")
    k = value.shape[0] // 2
    if prompt is not None and (prompt.ndim != 2 or prompt.shape != (k, value.shape[1])):
        raise JudgeError(
            f"gpm judge: {path}: prompt_head.weight has shape {list(prompt.shape)}, need [{k}, {value.shape[1]}] "
            f"(value_head.weight is {list(value.shape)})"
        )
    return value, prompt


def skew_scores(va, vb, w):
    """s = sum_i w_i (va[2i] vb[2i+1] - va[2i+1] vb[2i]) = va^T R^T vb, row by row (float64, exactly odd in a, b)."""
    va, vb, w = (np.asarray(x, dtype=np.float64) for x in (va, vb, w))
    return np.sum(w * (va[:, 0::2] * vb[:, 1::2] - va[:, 1::2] * vb[:, 0::2]), axis=-1)


class GPMJudge(Judge):
    """P(a beats b | x) = sigmoid(v_a^T R_x^T v_b / tau) of a GPM checkpoint (formula in the module docstring)."""

    antisymmetric = True

    def __init__(
        self,
        path,
        temperature=DEFAULT_TEMPERATURE,
        device="auto",
        batch_size=8,
        max_len=DEFAULT_MAX_LEN,
        dtype=None,
    ):
        if temperature is None or not temperature > 0 or not np.isfinite(temperature):
            raise JudgeError(f"gpm judge {path}: temperature (tau) must be a finite number > 0, got {temperature}")
        self.value_head, self.prompt_head = read_heads(path)
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        self.name = f"gpm:{path}"
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the heads (and lm_head) are "unexpected" for the base model
        try:
            self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise JudgeError(f"gpm judge: cannot load the base model of {path}: {e}") from e
        finally:
            transformers.logging.set_verbosity(verbosity)
        hidden = self.model.config.hidden_size
        if self.value_head.shape[1] != hidden:
            raise JudgeError(
                f"gpm judge: {path}: value_head.weight is {list(self.value_head.shape)} but the model's hidden size "
                f"is {hidden}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise JudgeError(f"gpm judge: the tokenizer of {path} has no EOS token (the embedding is read there)")
        self.dim = self.value_head.shape[0]
        self.temperature, self.batch_size, self.max_len = float(temperature), int(batch_size), int(max_len)
        self.forwards = 0  # sequences embedded so far

    def stats(self):
        return {"forwards": self.forwards}

    # ---- text ----

    def texts(self, prompt, response):
        """(full text, prompt-only text) as the authors render them."""
        tok = self.tokenizer
        if tok.chat_template:
            user = {"role": "user", "content": prompt}
            full = tok.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
            return full, tok.apply_chat_template([user], tokenize=False)
        return prompt + response, prompt

    # ---- embeddings ----

    def hidden_states(self, prompts, responses):
        """Last-layer hidden states (float64 numpy) at each sequence's last token (EOS) and at its prompt's last
        token: two arrays [m, hidden]."""
        import torch

        m = len(prompts)
        h_last = np.empty((m, self.value_head.shape[1]), dtype=np.float64)
        h_prompt = np.empty_like(h_last)
        tok = self.tokenizer
        for s in range(0, m, self.batch_size):
            e = min(m, s + self.batch_size)
            pairs = [self.texts(p, r) for p, r in zip(prompts[s:e], responses[s:e])]
            batch = tok([f for f, _ in pairs], truncation=True, max_length=self.max_len, padding=True)
            n_prompt = [
                len(tok(p, truncation=True, max_length=self.max_len)["input_ids"]) for _, p in pairs
            ]  # the prompt's own tokens, as the authors count them
            ids = torch.tensor(batch["input_ids"], dtype=torch.long)
            mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
            ids[:, -1] = tok.eos_token_id  # left padded: the last column is every row's last token
            mask[:, -1] = 1
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            length = ids.shape[1]
            n_full = mask.sum(-1)
            resp_len = n_full - torch.tensor(n_prompt)
            prompt_end = torch.maximum(length - 1 - resp_len, length - n_full).clamp(max=length - 1)
            with torch.no_grad():
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=pos.to(self.device),
                )
            hs = out.last_hidden_state
            rows = torch.arange(e - s, device=hs.device)
            h_last[s:e] = hs[:, -1].double().cpu().numpy()
            h_prompt[s:e] = hs[rows, prompt_end.to(hs.device)].double().cpu().numpy()
            self.forwards += e - s
        return h_last, h_prompt

    def embed(self, h_last):
        """Unit response embeddings v [m, 2k] (float64) from last-token hidden states."""
        v = np.asarray(h_last, dtype=np.float64) @ self.value_head.T
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    def block_weights(self, h_prompt):
        """w [m, k] = softmax(prompt_head(h)); all ones without a prompt head (the fixed rotation)."""
        h_prompt = np.asarray(h_prompt, dtype=np.float64)
        if self.prompt_head is None:
            return np.ones((h_prompt.shape[0], self.dim // 2))
        z = h_prompt @ self.prompt_head.T
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def preference_matrix(self, prompt, responses):
        """n x n matrix P[i][j] = P(responses[i] beats responses[j] | prompt), one forward per response."""
        h_last, h_prompt = self.hidden_states([prompt] * len(responses), list(responses))
        v = self.embed(h_last)
        w = self.block_weights(h_prompt[:1])
        n = len(responses)
        i, j = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
        return sigmoid(skew_scores(v[i], v[j], w) / self.temperature).reshape(n, n)

    def _prob(self, prompts, a, b):
        keys = list(dict.fromkeys(zip(prompts + prompts, a + b)))  # each distinct (prompt, response) once
        h_last, h_prompt = self.hidden_states([k[0] for k in keys], [k[1] for k in keys])
        v = self.embed(h_last)
        first = {}
        for row, (p, _) in enumerate(keys):
            first.setdefault(p, row)  # the prompt's hidden state from its first response's forward
        w_of = dict(zip(first, self.block_weights(h_prompt[list(first.values())])))
        row = {k: r for r, k in enumerate(keys)}
        ia = [row[p, x] for p, x in zip(prompts, a)]
        ib = [row[p, y] for p, y in zip(prompts, b)]
        w = np.stack([w_of[p] for p in prompts])
        return sigmoid(skew_scores(v[ia], v[ib], w) / self.temperature)


# ---- a cyclic GPM, built locally (tests, the demo) ----


def save_gpm_heads(path, value_head, prompt_head=None):
    """Write ``value_head`` (and ``prompt_head``) into the safetensors weights of the model saved at ``path``,
    next to the base model's tensors: the authors' layout. The heads take the weights' dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise JudgeError(f"save_gpm_heads: {file} not found (a single-file safetensors checkpoint is expected)")
    sd = load_file(file)
    dtype = next(iter(sd.values())).dtype
    sd["value_head.weight"] = torch.as_tensor(np.asarray(value_head), dtype=dtype).contiguous()
    sd.pop("prompt_head.weight", None)
    if prompt_head is not None:
        sd["prompt_head.weight"] = torch.as_tensor(np.asarray(prompt_head), dtype=dtype).contiguous()
    save_file(sd, file, metadata={"format": "pt"})
    return path


def build_tiny_gpm(path, value_head_dim=4, prompt_head=True, seed=0, words=None, **model_kwargs):
    """A tiny Llama (``comal_openrlhf.tiny``) saved with random GPM heads in the authors' layout; returns ``path``."""
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    build_tiny_llama(path, words=DEFAULT_WORDS if words is None else words, seed=seed, **model_kwargs)
    with open(os.path.join(path, "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    rng = np.random.default_rng(seed)
    value = rng.normal(0.0, 1.0, size=(value_head_dim, hidden))
    prompt = rng.normal(0.0, 1.0, size=(value_head_dim // 2, hidden)) if prompt_head else None
    return save_gpm_heads(path, value, prompt)


def build_cyclic_gpm(path, prompt, options, angles=(0.0, 120.0, 240.0), seed=0, words=None):
    """A tiny GPM (k = 1) whose value head puts ``options[i]`` (as the response to ``prompt``) at ``angles[i]``
    degrees in the plane. P(o_i beats o_j) = sigmoid(sin(angle_j - angle_i) / tau): at 0, 120, 240 degrees
    options[0] beats options[1] beats options[2] beats options[0], each with sigmoid(sin(120 deg) / tau).

    The value head is the least-norm linear map taking the options' last-token hidden states (computed in float64
    by the checkpoint itself) to the unit vectors at those angles; it is saved in the checkpoint's dtype, so the
    embeddings the saved checkpoint produces differ from the targets by that rounding: use ``induced_matrix`` for
    the exact P. Returns ``path``.
    """
    import torch

    from comal_openrlhf.tiny import DEFAULT_WORDS

    options = list(options)
    if len(angles) != len(options) or len(set(options)) != len(options):
        raise ValueError(f"need one angle per distinct option, got {len(angles)} angles for options {options}")
    extra = [w for o in options for w in o.split() if w not in DEFAULT_WORDS]
    words = list(DEFAULT_WORDS) + sorted(set(extra)) if words is None else words
    build_tiny_gpm(path, value_head_dim=2, prompt_head=True, seed=seed, words=words)
    judge = GPMJudge(path, device="cpu", dtype=torch.float64)
    h_last, _ = judge.hidden_states([prompt] * len(options), options)
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))
    target = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [n, 2]
    value = (np.linalg.pinv(h_last) @ target).T  # [2, hidden]: h_last @ value.T = target (rank n <= hidden)
    if not np.allclose(h_last @ value.T, target, atol=1e-8):
        raise JudgeError(f"build_cyclic_gpm: the options' hidden states are not linearly independent: {options}")
    return save_gpm_heads(path, value, judge.prompt_head)


def induced_matrix(path, prompt, options, temperature=DEFAULT_TEMPERATURE, device="cpu", dtype=None):
    """The exact preference matrix P[i][j] = P(options[i] beats options[j] | prompt) the GPM at ``path`` induces,
    computed from its embeddings (float64 forward by default, float64 formula): the game whose Nash policy COMAL
    should reach when this GPM is the judge and the policy only emits ``options``."""
    import torch

    judge = GPMJudge(path, temperature=temperature, device=device, dtype=torch.float64 if dtype is None else dtype)
    return judge.preference_matrix(prompt, list(options))
