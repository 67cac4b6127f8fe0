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
    z_x  = prompt_head(h[last token of the prompt])                                 (k logits)
    w_x  = softmax(z_x)                                   --judge.gpm_weights softmax (the default)
    w_x  = k * softmax(z_x / sqrt(hidden_size))           --judge.gpm_weights scaled
                                                          (k block weights; either way all 1 without a prompt head)
    R_x  = blockdiag([[0, -w_1], [w_1, 0]], ..., [[0, -w_k], [w_k, 0]])            (skew-symmetric)
    s(y, y' | x) = v_y^T R_x^T v_y' = sum_i w_i (v_y[2i] v_y'[2i+1] - v_y[2i+1] v_y'[2i])
    P(y beats y' | x) = sigmoid(s(y, y' | x) / tau)                                 (tau = --judge.temperature)

The block weights must follow the formula the checkpoint was trained with; the authors' repository holds both.
"softmax" is their published usage example (October 2024), which goes with their released checkpoints
(general-preference/GPM-Llama-3.1-8B, GPM-Gemma-2B, ...). "scaled" is their training model since its November 2024
change (general_preference/models/rw_model_general_preference.py; its ``hidden_dim`` is read here as the base model's
``hidden_size``, the width of the hidden states the prompt head reads): GPMs trained with their current code. The two
differ by more than a scale: for k >= 2 and unequal logits, w_scaled / k != w_softmax (the scaled softmax is flatter
by sqrt(hidden_size)), so no one temperature maps one onto the other and the probabilities change, not only their
sharpness. With equal logits (or k = 1) w_scaled = k * w_softmax, which a temperature k times larger undoes.

The orientation is the authors' (their score is ``chosen @ R^T @ rejected``, positive when the first response is
preferred). "The last token of the prompt" is the prompt's own chat-template rendering [user: prompt] measured in
tokens, inside the full sequence; under causal attention its hidden state does not depend on the response, so each
prompt's R_x is taken once per call (from the first of its responses) and every pair of that prompt uses it.

Since R_x is skew-symmetric, s(y, y') = -s(y', y) term by term: P(a beats b) + P(b beats a) = 1 and
P(a beats a) = 1/2 up to one rounding (``antisymmetric = True``: ``judge_pairs`` asks one order only). With k = 1 and
three responses at 0, 120 and 240 degrees the preference is a cycle (``judges.tiny_gpm.build_cyclic_gpm``), which
no reward model can represent. Each distinct (prompt, response) is embedded by one forward; all n(n-1) ordered
pairs of n responses then cost n forwards and n(n-1) k-term sums (``forwards`` counts the sequences embedded).
"""

import glob
import json
import os

import numpy as np

from comal_openrlhf.core.judging import Judge, JudgeError
from comal_openrlhf.judges.remote import sigmoid
from comal_openrlhf.judges.reward_model import resolve_device

DEFAULT_TEMPERATURE = 0.1  # the authors' tau
DEFAULT_MAX_LEN = 4096  # the authors' max_length
# --judge.gpm_weights: the prompt's block weights w from the logits z = prompt_head(h), k = len(z), H = hidden size
WEIGHTS = {
    "softmax": "softmax(z): the authors' usage example, for their released checkpoints (the default)",
    "scaled": "k * softmax(z / sqrt(H)): the authors' training code since November 2024",
}
DEFAULT_WEIGHTS = "softmax"


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
    """P(a beats b | x) = sigmoid(v_a^T R_x^T v_b / tau) of a GPM checkpoint (formula in the module docstring;
    ``gpm_weights``: the block weights' formula, a key of ``WEIGHTS``)."""

    antisymmetric = True

    def __init__(
        self,
        path,
        temperature=DEFAULT_TEMPERATURE,
        device="auto",
        batch_size=8,
        max_len=DEFAULT_MAX_LEN,
        dtype=None,
        gpm_weights=DEFAULT_WEIGHTS,
    ):
        if not isinstance(gpm_weights, str) or gpm_weights not in WEIGHTS:
            raise JudgeError(
                f"gpm judge {path}: --judge.gpm_weights must be one of {', '.join(map(repr, WEIGHTS))} (the block "
                f"weights' formula the checkpoint was trained with), got {gpm_weights!r}"
            )
        self.gpm_weights = gpm_weights
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
        """w [m, k] from the prompts' hidden states: softmax(prompt_head(h)), or k * softmax(prompt_head(h) /
        sqrt(hidden)) with ``gpm_weights="scaled"``; all ones without a prompt head (the fixed rotation)."""
        h_prompt = np.asarray(h_prompt, dtype=np.float64)
        k = self.dim // 2
        if self.prompt_head is None:
            return np.ones((h_prompt.shape[0], k))
        z = h_prompt @ self.prompt_head.T
        scale = 1.0
        if self.gpm_weights == "scaled":
            z = z / np.sqrt(self.prompt_head.shape[1])
            scale = float(k)
        z = np.exp(z - z.max(-1, keepdims=True))
        return scale * z / z.sum(-1, keepdims=True)

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
