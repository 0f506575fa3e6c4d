#!/bin/bash
# D-CHAG training on one machine with torchrun (GPUs, or gloo on CPU).
#
#   launch/local.sh [-n NPROC] [ENTRY.py] [--config FILE] [overrides...] [flags...]
#   launch/local.sh -n 2 pretrain_hyperspectral.py --config configs/hyperspectral/tiny.yaml --data-path DIR
#
# NPROC: -n, else $NPROC, else the number of GPUs (at least 1). The entry script defaults to
# $DCHAG_ENTRY, else pretrain_hyperspectral.py; everything after it goes to the entry script.
# On CPU each process uses OMP_NUM_THREADS threads (default: cores / NPROC).
set -euo pipefail

nproc_arg=""
if [ "${1:-}" = "-n" ]; then
    nproc_arg="${2:?-n needs a number of processes}"
    shift 2
fi
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

if [ -n "$nproc_arg" ]; then
    NPROC="$nproc_arg"
elif [ -z "${NPROC:-}" ]; then
    NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: the number of processes must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
cores="$(nproc 2>/dev/null || echo 1)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}"
export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}"
# On SIGTERM/SIGINT torchrun forwards the signal and waits this long before SIGKILLing the ranks:
# long enough for the stop-save at the next step boundary (torch's default is 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; Slurm variables of an enclosing allocation
# are then ignored (torchrun's win).
port="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" \
    --master-addr=127.0.0.1 --master-port="$port" "$ENTRY" "${ENTRY_ARGS[@]}"
