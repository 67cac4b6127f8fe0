#!/usr/bin/env bash
# The paper's head-to-head table (arXiv 2410.23223, section 6): every trained Llama-3-8B-Instruct policy against every
# other under the Skywork + ArmoRM oracle, row beats column (%), average over columns with self = 50, each cell with a
# bootstrap 95% interval over prompts; plus each policy's exploitability estimate (best-of-4 response of the oracle
# against 4 other samples of the policy: a lower bound on its duality gap).
#
# Hardware: 1 GPU of 80 GB is enough (policies are loaded one at a time; the two 8B reward models judge); vLLM
# engines speed up sampling (--rollout.backend vllm). Expected time: about 2 h for 5 policies on 2,000 prompts
# (estimate, not measured). Generations and judgements are cached in $OUT/eval/cache: a rerun after a crash, or
# with one more policy, only does the new work.
# Paper's numbers (Llama-3-8B-Instruct, %): COMAL vs BASE 90.43, vs Iter-IPO 60.25, vs INPO 64.22; COMAL average
# 71.37 over 8 systems.
source "$(dirname "$0")/common.sh"

BASE=${BASE:-meta-llama/Meta-Llama-3-8B-Instruct}

run python -m comal_openrlhf.cli.evaluate \
    --policies base="$BASE" comal="$OUT/comal_llama3_8b/final" inpo="$OUT/inpo_llama3_8b/final" \
    iter-ipo="$OUT/iter-ipo_llama3_8b/final" iter-dpo="$OUT/iter-dpo_llama3_8b/final" \
    --data.dataset "$PROMPTS" --data.dataset_split "$EVAL_PROMPTS_SPLIT" --data.prompt_key prompt \
    --data.apply_chat_template --data.max_samples 2000 --data.max_len 2048 \
    --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --judge.batch_size 16 \
    --rollout.n_samples_per_prompt 2 --rollout.temperature 0.8 --rollout.top_p 0.95 --rollout.max_new_tokens 1024 \
    --rollout.generate_batch_size 32 --eval.exploit_m 4 --eval.exploit_samples 4 \
    --out "$OUT/eval"
