"""Tiny General Preference Models built locally (no hub), in the authors' checkpoint layout, for tests and the demo:
``build_tiny_gpm`` (random heads), ``build_cyclic_gpm`` (a k = 1 GPM whose options form a preference cycle, which
no reward model can represent) and ``induced_matrix`` (the exact game such a GPM induces on a set of options)."""

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from comal_openrlhf.judges.gpm import DEFAULT_TEMPERATURE, DEFAULT_WEIGHTS, GPMJudge, JudgeError
from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama


def save_gpm_heads(path, value_head, prompt_head=None):
    """Write ``value_head`` (and ``prompt_head``) into the safetensors weights of the model saved at ``path``,
    next to the base model's tensors: the authors' layout. The heads take the weights' dtype."""
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


def induced_matrix(
    path, prompt, options, temperature=DEFAULT_TEMPERATURE, device="cpu", dtype=None, gpm_weights=DEFAULT_WEIGHTS
):
    """The exact preference matrix P[i][j] = P(options[i] beats options[j] | prompt) the GPM at ``path`` induces,
    computed from its embeddings (float64 forward by default, float64 formula): the game whose Nash policy COMAL
    should reach when this GPM is the judge and the policy only emits ``options``."""
    dtype = torch.float64 if dtype is None else dtype
    judge = GPMJudge(path, temperature=temperature, device=device, dtype=dtype, gpm_weights=gpm_weights)
    return judge.preference_matrix(prompt, list(options))
