"""A Bradley-Terry reward model as a judge: P(a beats b) = sigmoid((r(x, a) - r(x, b)) / temperature).

The model is any OpenRLHF/HF reward model, loaded with ``openrlhf.models.get_llm_for_sequence_regression(path,
"reward")`` (scalar value head at the last token). Texts are built as OpenRLHF's RewardDataset builds them: the
tokenizer's chat template over [user: prompt, assistant: response] when it has one, else prompt + response; then
the EOS token is appended if missing and kept as the last token under truncation, where the reward is read.

Within one call each unique (prompt, response) is scored once. The judge is antisymmetric by construction, so
``judge_pairs`` asks one order only.
"""

import numpy as np

from comal_openrlhf import cpu_runtime
from comal_openrlhf.core.judging import Judge, JudgeError
from comal_openrlhf.judges.remote import sigmoid


def resolve_device(device):
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RewardModelJudge(Judge):
    antisymmetric = True  # sigmoid((r_a - r_b) / T) + sigmoid((r_b - r_a) / T) = 1

    def __init__(self, path, temperature=1.0, device="auto", batch_size=8, max_len=2048, param_dtype="bf16"):
        if not path:
            raise JudgeError("reward_model judge needs --judge.path")
        if temperature <= 0:
            raise JudgeError(f"reward_model judge {path}: temperature must be > 0, got {temperature}")

        cpu_runtime.apply()  # openrlhf.models imports flash_attn; a no-op when CUDA is there
        from openrlhf.models import get_llm_for_sequence_regression
        from openrlhf.utils import get_tokenizer

        self.device = resolve_device(device)
        self.model = get_llm_for_sequence_regression(
            path, "reward", param_dtype=param_dtype, attn_implementation="sdpa", normalize_reward=False
        )
        self.model.to(self.device).eval()
        self.tokenizer = get_tokenizer(path, self.model, "left", None)
        self.temperature, self.batch_size, self.max_len = temperature, int(batch_size), int(max_len)
        self.name = f"reward_model:{path}"

    def text(self, prompt, response):
        tok = self.tokenizer
        if tok.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = tok.apply_chat_template(messages, tokenize=False)
        else:
            text = prompt + response
        text = text.rstrip()  # the reward is read at the EOS token: end on exactly one
        return text if text.endswith(tok.eos_token) else text + " " + tok.eos_token

    def scores(self, prompts, responses):
        """Reward of each (prompt, response), as float64."""
        import torch

        out = np.empty(len(prompts), dtype=np.float64)
        for s in range(0, len(prompts), self.batch_size):
            e = s + self.batch_size
            texts = [self.text(p, r) for p, r in zip(prompts[s:e], responses[s:e])]
            batch = self.tokenizer(
                texts,
                return_tensors="pt",
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=self.max_len,
            )
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            ids[:, -1] = self.tokenizer.eos_token_id  # left padded: the last column is every row's last token
            with torch.no_grad():
                out[s : s + len(texts)] = self.model(ids, attention_mask=mask).float().cpu().numpy()
        return out

    def _prob(self, prompts, a, b):
        keys = list(dict.fromkeys(zip(prompts + prompts, a + b)))
        r = dict(zip(keys, self.scores([k[0] for k in keys], [k[1] for k in keys])))
        diff = np.array([r[p, x] - r[p, y] for p, x, y in zip(prompts, a, b)])
        return sigmoid(diff / self.temperature)
