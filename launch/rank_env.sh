#!/bin/bash
# Per-task environment, run by srun for every task:  srun ... launch/rank_env.sh python ENTRY ARGS...
# Sets what must differ between the tasks of one node, then execs the command.
#   - MIOpen's kernel database and cache on node-local /tmp, one directory per task (a shared
#     directory on Lustre, or one shared by the node's tasks, serializes on its sqlite lock).
if [ -n "${DCHAG_MIOPEN_CACHE_ROOT:-}" ]; then
    dir="${DCHAG_MIOPEN_CACHE_ROOT}/rank${SLURM_LOCALID:-0}"
    mkdir -p "$dir"
    export MIOPEN_USER_DB_PATH="$dir"
    export MIOPEN_CUSTOM_CACHE_DIR="$dir"
fi
exec "$@"
