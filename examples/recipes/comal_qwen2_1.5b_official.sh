#!/usr/bin/env bash
# The official COMAL code's setting: Qwen2-1.5B-Instruct, beta 0.002, r = 1/3, 24 iterations, the reference advanced
# every 12, a generative pairwise judge (Llama-3-OffsetBias-8B: A/B label-token probabilities, both orders
# averaged), top2 pairs (best vs second best of 5 samples).
#
# Hardware: 1 node, 4 x 80 GB GPUs (policy ZeRO-2 over 4 ranks, one vLLM engine, the 8B judge on rank 0's GPU).
# Expected time: about 20 min per iteration, 8 h in all (estimate, not measured).
# Paper's numbers: none published for this setting (the paper's tables are the Llama-3-8B and Qwen2.5-7B runs);
# compare with the evaluate command: the final policy against the start policy and the iterate of round 1.
source "$(dirname "$0")/common.sh"

BASE=${BASE:-Qwen/Qwen2-1.5B-Instruct}
JUDGE=${JUDGE:-NCSOFT/Llama-3-OffsetBias-8B}
RUN=${RUN:-$OUT/comal_qwen2_1.5b}

run deepspeed --num_gpus 4 --module openrlhf.cli.train_comal \
    --model.model_name_or_path "$BASE" \
    --comal.algo comal --comal.iterations 24 --comal.ref_update_interval 12 --comal.ref_weight 0.3333333333 \
    --model.beta 0.002 \
    --comal.source online --rollout.prompts_per_iteration 2000 --rollout.pair_rule top2 \
    --rollout.backend vllm --vllm.num_engines 1 --vllm.gpu_memory_utilization 0.3 \
    --judge.kind pairwise_lm --judge.path "$JUDGE" --judge.labels A,B --judge.device cuda:0 \
    "${ROLLOUT[@]}" "${DATA[@]}" \
    --train.micro_batch_size 2 --data.max_len 2048 --ds.zero_stage 2 \
    --ds.param_dtype bf16 --model.gradient_checkpointing_enable \
    --eval.dataset "$PROMPTS" --eval.split "$EVAL_PROMPTS_SPLIT" --comal.keep_best \
    --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tb" --logger.wandb.run_name comal_qwen2_1.5b
