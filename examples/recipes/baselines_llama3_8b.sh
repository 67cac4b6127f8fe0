#!/usr/bin/env bash
# The paper's baselines on Llama-3-8B-Instruct with the same budget as comal_llama3_8b.sh (18 iterations, the same
# prompts, samples, oracle, pair rule and optimizer): INPO (r = 1/3, the anchor never advances), Iter-IPO (r = 0)
# and Iter-DPO (dpo loss, r = 0). ALGOS="inpo iter-ipo" runs a subset.
#
# Hardware: 1 node, 8 x 80 GB GPUs; one algorithm after the other. Expected time: about 30 h per algorithm
# (estimate, not measured). Paper's numbers: Iter-IPO and INPO at beta 0.002 collapse after about 7 iterations;
# averages over 8 systems: Iter-IPO (best checkpoint) 66.93, INPO (best checkpoint) 63.44, COMAL 71.37.
source "$(dirname "$0")/common.sh"

BASE=${BASE:-meta-llama/Meta-Llama-3-8B-Instruct}
ALGOS=${ALGOS:-inpo iter-ipo iter-dpo}

for ALGO in $ALGOS; do
    RUN=$OUT/${ALGO}_llama3_8b
    case $ALGO in
        inpo) ALGO_FLAGS=(--comal.ref_weight 0.3333333333 --model.beta 0.002) ;;
        iter-ipo) ALGO_FLAGS=(--model.beta 0.002) ;;
        iter-dpo) ALGO_FLAGS=(--model.beta 0.1) ;;
        *) echo "unknown algorithm $ALGO" >&2; exit 2 ;;
    esac
    run deepspeed --num_gpus 8 --module openrlhf.cli.train_comal \
        --model.model_name_or_path "$BASE" \
        --comal.algo "$ALGO" --comal.iterations 18 "${ALGO_FLAGS[@]}" \
        --comal.source online --rollout.prompts_per_iteration 3000 --rollout.pair_rule top2 \
        --rollout.backend vllm --vllm.num_engines 2 --vllm.gpu_memory_utilization 0.4 \
        --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --judge.batch_size 16 \
        "${ROLLOUT[@]}" "${DATA[@]}" "${TRAIN[@]}" \
        --eval.dataset "$PROMPTS" --eval.split "$EVAL_PROMPTS_SPLIT" --comal.keep_best \
        --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --ckpt.save_hf \
        --logger.tensorboard_dir "$RUN/tb" --logger.wandb.run_name "${ALGO}_llama3_8b"
done
