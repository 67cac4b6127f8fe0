#!/usr/bin/env bash
# COMAL on Qwen2.5-7B-Instruct with UltraFeedback prompts (arXiv 2410.23223, v2 setting), one node.
#
# Hardware: 1 node, 8 x 80 GB GPUs. Same layout as comal_llama3_8b.sh.
# Expected time: about 30 h for the 18 iterations (estimate, not measured: no GPU run of this recipe yet).
# Setting: 18 iterations in 3 rounds of 6, beta 0.002 in every round (the paper raises beta to 0.1 after round 1
# only for Llama), r = 1/3, the Skywork + ArmoRM oracle, top2 pairs.
# Paper's numbers to compare with (head-to-head win rate %, row COMAL): average 68.93; 56.89 vs Iter-IPO,
# 57.89 vs INPO.
source "$(dirname "$0")/common.sh"

BASE=${BASE:-Qwen/Qwen2.5-7B-Instruct}
RUN=${RUN:-$OUT/comal_qwen25_7b}

run deepspeed --num_gpus 8 --module openrlhf.cli.train_comal \
    --model.model_name_or_path "$BASE" \
    --comal.algo comal --comal.iterations 18 --comal.ref_update_interval 6 --comal.round_length 6 \
    --comal.ref_weight 0.3333333333 --model.beta 0.002 \
    --comal.source online --rollout.prompts_per_iteration 3000 --rollout.pair_rule top2 \
    --rollout.backend vllm --vllm.num_engines 2 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.4 \
    --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --judge.batch_size 16 \
    "${ROLLOUT[@]}" "${DATA[@]}" "${TRAIN[@]}" \
    --eval.dataset "$PROMPTS" --eval.split "$EVAL_PROMPTS_SPLIT" --comal.keep_best \
    --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tb" --logger.wandb.run_name comal_qwen25_7b
