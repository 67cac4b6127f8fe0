#!/usr/bin/env bash
# COMAL on Llama-3-8B-Instruct (the comal_llama3_8b.sh setting) on several nodes: torchrun started on every node.
#
# Hardware: NODES nodes x 8 x 80 GB GPUs (default 2), a shared filesystem for $OUT, and a Ray cluster for the vLLM
# engines (`ray start --head` on one node, `ray start --address HEAD:6379` on the others, then export
# RAY_ADDRESS=HEAD:6379 before launching).
# Launch: run this script once on every node, with NODE_RANK 0..NODES-1 and MASTER_ADDR the address of node 0; under
# SLURM (sbatch --nodes N --ntasks-per-node 1, then `srun bash comal_llama3_8b_multinode.sh`) the job's environment
# gives them: SLURM_NNODES -> --nnodes, SLURM_PROCID (one task per node) -> --node_rank, the first host of
# SLURM_JOB_NODELIST -> --master_addr, as OpenRLHF's train_nonrl_slurm.sh maps them.
# This is the launch tests/test_multinode.py runs for real on one machine (two nodes of one process each on
# 127.0.0.1, gloo, ZeRO-3, a tiny model): it trains as one node of as many processes, and a lost node stops the
# others within --comal.dist_timeout seconds with one error line naming it; relaunch every node with RESUME=1
# (--ckpt.load_enable) to continue from the last checkpoint.
# Expected time: about 18 h for the 18 iterations on 2 nodes (estimate, not measured: no GPU run yet).
# Paper's numbers: as comal_llama3_8b.sh (COMAL average win rate 71.37 over 8 systems).
source "$(dirname "$0")/common.sh"

BASE=${BASE:-meta-llama/Meta-Llama-3-8B-Instruct}
RUN=${RUN:-$OUT/comal_llama3_8b_multinode}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT=${DIST_TIMEOUT:-180}      # seconds a collective waits for a lost or hung peer
if [[ -n "${SLURM_JOB_ID:-}${SLURM_NNODES:-}" ]]; then
    NODES=$SLURM_NNODES
    NODE_RANK=$SLURM_PROCID
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
else
    NODES=${NODES:-2}
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-node-1}
fi
RESUME_FLAGS=()
[[ -n "${RESUME:-}" ]] && RESUME_FLAGS=(--ckpt.load_enable)

run torchrun --nnodes "$NODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m openrlhf.cli.train_comal \
    --model.model_name_or_path "$BASE" \
    --comal.algo comal --comal.iterations 18 --comal.ref_update_interval 6 --comal.round_length 6 \
    --comal.ref_weight 0.3333333333 --model.beta 0.002 --comal.beta_schedule 0.002,0.1 \
    --comal.source online --rollout.prompts_per_iteration 3000 --rollout.pair_rule top2 \
    --rollout.backend vllm --vllm.num_engines 8 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.4 \
    --judge.kind mixture --judge.mixture "$ORACLE" --judge.device cuda:0 --judge.batch_size 16 \
    "${ROLLOUT[@]}" "${DATA[@]}" "${TRAIN[@]}" \
    --eval.dataset "$PROMPTS" --eval.split "$EVAL_PROMPTS_SPLIT" --comal.keep_best \
    --comal.dist_timeout "$DIST_TIMEOUT" "${RESUME_FLAGS[@]}" \
    --ckpt.output_dir "$RUN/final" --ckpt.path "$RUN/ckpt" --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tb" --logger.wandb.run_name comal_llama3_8b_multinode
