# Shared by the launch scripts (sourced, not run). Sets:
#   DCHAG_HOME   the repository (default: the directory sbatch was called from, else this file's parent)
#   ENTRY        the entry script: the first argument if it ends in .py, else $DCHAG_ENTRY
#                (default pretrain_hyperspectral.py); the remaining arguments go to it unchanged
#   ENTRY_ARGS   those arguments (an array): --config FILE, dotted overrides, Megatron-style flags
#   PYTHON       the interpreter ($DCHAG_PYTHON, else python)
# and exports MASTER_ADDR (first host of the allocation) and MASTER_PORT for the rendezvous.

if [ -n "${DCHAG_HOME:-}" ]; then
    :
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/megatron_dchag/__init__.py" ]; then
    DCHAG_HOME="$SLURM_SUBMIT_DIR"   # sbatch runs a copy of the script: $0 is not in the repository
else
    DCHAG_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
export DCHAG_HOME
cd "$DCHAG_HOME" || { echo "error: cannot cd to DCHAG_HOME=$DCHAG_HOME" >&2; exit 2; }

# A site environment (modules, conda/venv activation) before anything runs python.
if [ -n "${DCHAG_ENV_SCRIPT:-}" ]; then
    # shellcheck disable=SC1090
    source "$DCHAG_ENV_SCRIPT"
fi
PYTHON="${DCHAG_PYTHON:-python}"
export PYTHONPATH="$DCHAG_HOME${PYTHONPATH:+:$PYTHONPATH}"

if [ $# -gt 0 ] && [[ "$1" == *.py ]]; then
    ENTRY="$1"
    shift
else
    ENTRY="${DCHAG_ENTRY:-pretrain_hyperspectral.py}"
fi
ENTRY_ARGS=("$@")
if [ ! -f "$ENTRY" ]; then
    echo "error: entry script '$ENTRY' not found (in $DCHAG_HOME)" >&2
    exit 2
fi

dchag_slurm_rendezvous() {
    # MASTER_ADDR: the first host of the allocation (python's Slurm host-list expansion: no scontrol needed).
    if [ -z "${MASTER_ADDR:-}" ]; then
        local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
        if [ -z "$nodelist" ]; then
            echo "error: no SLURM_JOB_NODELIST: run this inside a Slurm allocation (sbatch or salloc)" >&2
            exit 2
        fi
        MASTER_ADDR="$("$PYTHON" -m megatron_dchag.launch_env --first-host "$nodelist")" || exit 2
        export MASTER_ADDR
    fi
    # MASTER_PORT: derived from the job id, so jobs sharing a node do not collide.
    if [ -z "${MASTER_PORT:-}" ]; then
        export MASTER_PORT=$(( 10000 + ${SLURM_JOB_ID:-19500} % 20000 ))
    fi
    # Each task gets its rank from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (see
    # megatron_dchag.launch_env); torchrun's variables must not leak in from the submitting shell.
    unset RANK LOCAL_RANK WORLD_SIZE
}
