#!/bin/bash
# DDP without SLURM: run this script once on every node (same arguments except NODE_RANK).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 cluster/torchrun.sh --trainer.max_steps=20000
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=4 cluster/torchrun.sh --trainer.max_steps=20000
# One machine, 2 CPU processes (gloo):  NPROC_PER_NODE=2 cluster/torchrun.sh --trainer.accelerator=cpu
# torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; Lightning detects them
# (TorchElasticEnvironment) and does not launch processes itself, so devices and num_nodes must
# match --nproc_per_node and --nnodes.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m hiertrans fit --config lm.yaml \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE" --trainer.strategy=ddp \
    "$@"
