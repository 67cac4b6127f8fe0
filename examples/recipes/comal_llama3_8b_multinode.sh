#!/usr/bin/env bash
# COMAL on Llama-3-8B-Instruct (the comal_llama3_8b.sh setting) on several nodes.
#
# Hardware: NODES nodes x 8 x 80 GB GPUs (default 2), a shared filesystem for $OUT, and a Ray cluster for the vLLM
# engines (`ray start --head` on one node, `ray start --address HEAD:6379` on the others, then export
# RAY_ADDRESS=HEAD:6379 before launching). Training: DeepSpeed over all GPUs of the hostfile (LAUNCHER=deepspeed,
# default) or torchrun started on every node with its NODE_RANK (LAUNCHER=torchrun).
# Expected time: about 18 h for the 18 iterations on 2 nodes (estimate, not measured: no GPU run yet).
# Paper's numbers: as comal_llama3_8b.sh (COMAL average win rate 71.37 over 8 systems).
source "$(dirname "$0")/common.sh"

BASE=${BASE:-meta-llama/Meta-Llama-3-8B-Instruct}
RUN=${RUN:-$OUT/comal_llama3_8b_multinode}
NODES=${NODES:-2}
HOSTFILE=${HOSTFILE:-hostfile}            # lines "node-1 slots=8"
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_ADDR=${MASTER_ADDR:-node-1}
NODE_RANK=${NODE_RANK:-0}

if [[ $LAUNCHER == deepspeed ]]; then
    LAUNCH=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus 8 --master_addr "$MASTER_ADDR"
        --module)
else
    LAUNCH=(torchrun --nnodes "$NODES" --nproc_per_node 8 --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
        --master_port 29500 -m)
fi

run "${LAUNCH[@]}" openrlhf.cli.train_comal \
    --model.model_name_or_path "$BASE" \
    --comal.algo comal --comal.iterations 18 --comal.ref_update_interval 6 --comal.round_length 6 \
    --comal.ref_weight 0.3333333333 --model.beta 0.002 --comal.beta_schedule 0.002,0.1 \
    --comal.source online --rollout.prompts_per_iteration 3000 --rollout.pair_rule top2 \
    --rollout.backend vllm --vllm.num_engines 8 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.4 \
    --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --judge.batch_size 16 \
    "${ROLLOUT[@]}" "${DATA[@]}" "${TRAIN[@]}" \
    --eval.dataset "$PROMPTS" --eval.split "$EVAL_PROMPTS_SPLIT" --comal.keep_best \
    --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tb" --logger.wandb.run_name comal_llama3_8b_multinode
