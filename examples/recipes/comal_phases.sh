#!/usr/bin/env bash
# COMAL as separate phases, the official code's workflow and the way to put sampling and judging on other machines:
# per iteration k, generate (SHARDS shards, e.g. one per GPU or per machine) -> judge (sharded, then merged) ->
# train_comal on the offline pairs, resuming its checkpoint for one more iteration. Setting as comal_llama3_8b.sh.
#
# Hardware: any number of GPU machines sharing $OUT. Each generate shard needs one GPU for the 8B policy (HF
# generate here; --rollout.backend vllm for vLLM engines); each judge shard needs the two 8B reward models (one
# 80 GB GPU); training as comal_llama3_8b.sh (8 GPUs). Here all shards run on this node, one per GPU; on several
# machines run the same generate/judge line on each with its own --shard i/n.
# Expected time: about 30 h on one 8-GPU node (estimate, not measured: no GPU run yet).
# The per-iteration resume relies on train_comal's --ckpt.load_enable with --comal.accept_plan_change (the plan
# grows by one iteration each time).
# Paper's numbers: as comal_llama3_8b.sh.
source "$(dirname "$0")/common.sh"

BASE=${BASE:-meta-llama/Meta-Llama-3-8B-Instruct}
RUN=${RUN:-$OUT/comal_phases}
ITERATIONS=${ITERATIONS:-18}
SHARDS=${SHARDS:-8}
SEED=${SEED:-42}

for ((k = 0; k < ITERATIONS; k++)); do
    POLICY=$BASE
    if ((k > 0)); then POLICY=$RUN/final; fi
    for ((i = 0; i < SHARDS; i++)); do
        run env CUDA_VISIBLE_DEVICES=$i python -m comal_openrlhf.cli.generate --model.model_name_or_path "$POLICY" \
            --policy_id "iter_$k" --iteration "$k" --rollout.prompts_per_iteration 3000 --shard "$i/$SHARDS" \
            "${ROLLOUT[@]}" "${DATA[@]}" --data.max_len 2048 --train.seed "$SEED" \
            --output "$RUN/samples/iter_$k.shard$i.jsonl" &
    done
    wait
    for ((i = 0; i < SHARDS; i++)); do
        run env CUDA_VISIBLE_DEVICES=$i python -m comal_openrlhf.cli.judge --samples "$RUN/samples/iter_$k.shard*.jsonl" \
            --iteration "$k" --shard "$i/$SHARDS" --out_dir "$RUN/pairs" --rollout.pair_rule top2 \
            --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --train.seed "$SEED" &
    done
    wait
    run python -m comal_openrlhf.cli.judge --merge --iteration "$k" --out_dir "$RUN/pairs"
    run deepspeed --num_gpus 8 --module openrlhf.cli.train_comal \
        --model.model_name_or_path "$BASE" --comal.pairs_dir "$RUN/pairs" --comal.iterations $((k + 1)) \
        --comal.algo comal --comal.ref_update_interval 6 --comal.round_length 6 --comal.ref_weight 0.3333333333 \
        --model.beta 0.002 --comal.beta_schedule 0.002,0.1 --train.seed "$SEED" \
        --data.prompt_key prompt --data.apply_chat_template "${TRAIN[@]}" \
        --ckpt.load_enable --comal.accept_plan_change \
        --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --logger.tensorboard_dir "$RUN/tb"
done
