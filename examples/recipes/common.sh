# Shared by the recipes (source it). DRY_RUN=1 prints each command (shell-quoted, one per line) instead of running
# it: tests/test_recipes.py parses every printed command with the parser of the program it launches.
set -euo pipefail

run() {
    if [[ -n "${DRY_RUN:-}" ]]; then
        local line
        line=$(printf '%q ' "$@")
        echo "$line"  # one write per command: shards launched with & do not interleave their lines
    else
        "$@"
    fi
}

# The paper's setting (arXiv 2410.23223, v2): UltraFeedback prompts, the oracle is the mixture
# 1/2 sigma(r_Skywork(y1) - r_Skywork(y2)) + 1/2 sigma(r_ArmoRM(y1) - r_ArmoRM(y2)).
PROMPTS=${PROMPTS:-HuggingFaceH4/ultrafeedback_binarized}
PROMPTS_SPLIT=${PROMPTS_SPLIT:-train_prefs}
EVAL_PROMPTS_SPLIT=${EVAL_PROMPTS_SPLIT:-test_prefs}
SKYWORK=${SKYWORK:-Skywork/Skywork-Reward-Llama-3.1-8B-v0.2}
ARMORM=${ARMORM:-RLHFlow/ArmoRM-Llama3-8B-v0.1}
ORACLE="reward_model:${SKYWORK}:0.5,reward_model:${ARMORM}:0.5"
OUT=${OUT:-runs}

# Sampling as the official pipeline (the published numbers): 5 samples per prompt, temperature 0.8, top-p 0.95. The
# run says at start that the convergence guarantee does not hold for tempered samples; drop the temperature and top-p
# flags (defaults 1.0 / 1.0) to sample mu_k itself.
ROLLOUT=(--rollout.n_samples_per_prompt 5 --rollout.temperature 0.8 --rollout.top_p 0.95
    --rollout.max_new_tokens 1024)
# Training: the preset (--comal.algo) fills the official recipe (AdamW lr 5e-7, 10% warm-up then linear decay, 3 epochs
# per iteration, 32 prompts per step, betas (0.9, 0.999), weight decay 0.01, no clipping; train_comal prints the table);
# what follows is the hardware's part.
TRAIN=(--train.micro_batch_size 1 --data.max_len 2048
    --model.gradient_checkpointing_enable --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2)
DATA=(--data.dataset "$PROMPTS" --data.dataset_split "$PROMPTS_SPLIT" --data.prompt_key prompt
    --data.apply_chat_template)
