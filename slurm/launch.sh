#!/usr/bin/env bash
# The launcher slurm/softgrpo.sbatch runs inside a Slurm allocation: one `softgrpo train` task per
# GPU on every node (or SOFTGRPO_TASKS_PER_NODE CPU tasks), preemption forwarded to the tasks, and a
# requeue when the trainer exits for one.
#
#   bash slurm/launch.sh RECIPE [dotted.key=value ...]      (from a batch script; needs SLURM_JOB_ID)
#
# What it does:
# - run directory runs/<job name>/<job id>/ (under SOFTGRPO_RUNS_DIR, default $SLURM_SUBMIT_DIR/runs):
#   this script's and the tasks' output go to slurm.out there; `logger.log_dir` is the run directory and
#   `checkpointing.checkpoint_dir` its checkpoints/ unless the overrides set them. The job id survives
#   a requeue, so a requeued job finds its own checkpoints and resumes.
# - MASTER_ADDR = first node of the job, MASTER_PORT = 20000 + job id % 10000 (as
#   megatron_softgrpo.distributed.slurm_master_port derives it), exported to every task.
# - srun --nodes=<job nodes> --ntasks-per-node=<tasks> [--cpus-per-task=<job's>], tasks =
#   SOFTGRPO_TASKS_PER_NODE, else the job's GPUs per node, else its --ntasks-per-node (srun of Slurm
#   >= 22.05 does not inherit --cpus-per-task from sbatch); pyxis flags only when set: SOFTGRPO_CONTAINER_IMAGE
#   (--container-image, --container-workdir=$PWD), SOFTGRPO_CONTAINER_MOUNTS (--container-mounts).
# - SIGUSR1 or SIGTERM to this shell (sbatch --signal=B:..., scancel --batch) is passed on to the
#   tasks as SIGUSR1 (srun itself would answer SIGTERM by killing them). The trainer then saves a
#   checkpoint and exits 75; this script then runs `scontrol requeue $SLURM_JOB_ID`, and the requeued
#   job resumes from that checkpoint.
# - SOFTGRPO_PYTHON: the Python that has megatron_softgrpo (default python3; inside the container
#   when one is used).
# - SOFTGRPO_COMMAND: the softgrpo subcommand the tasks run (default train; `eval` for evaluation jobs,
#   as scripts/study.py submits them).
set -euo pipefail

REQUEUE_EXIT_CODE=75  # megatron_softgrpo.train.preemption.REQUEUE_EXIT_CODE

if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch flags] slurm/softgrpo.sbatch RECIPE [dotted.key=value ...]" >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm/launch.sh runs inside a Slurm job: submit slurm/softgrpo.sbatch with sbatch" >&2
  exit 2
fi

job_name=${SLURM_JOB_NAME:-softgrpo}
run_dir=${SOFTGRPO_RUNS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/$job_name/$SLURM_JOB_ID
mkdir -p "$run_dir"
echo "[launch] job $SLURM_JOB_ID: output in $run_dir/slurm.out"
exec >>"$run_dir/slurm.out" 2>&1

gpus_per_node=${SLURM_GPUS_PER_NODE:-0}
gpus_per_node=${gpus_per_node##*:}  # typed requests read "a100:8"
if [ -n "${SOFTGRPO_TASKS_PER_NODE:-}" ]; then
  tasks_per_node=$SOFTGRPO_TASKS_PER_NODE
elif [ "$gpus_per_node" -gt 0 ]; then
  tasks_per_node=$gpus_per_node
else
  tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
fi
num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE would fail the pipeline
MASTER_ADDR=${hosts%%$'\n'*}
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))  # below the kernel's ephemeral ports (32768+)
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1  # the tasks' output reaches slurm.out as it is printed
unset RANK WORLD_SIZE LOCAL_RANK  # the trainer would take them for a torchrun launch

overrides=("${@:2}")
has_override() {
  local item
  for item in "${overrides[@]}"; do
    [ "${item%%=*}" = "$1" ] && return 0
  done
  return 1
}
has_override logger.log_dir || overrides+=("logger.log_dir=$run_dir")
has_override checkpointing.checkpoint_dir || overrides+=("checkpointing.checkpoint_dir=$run_dir/checkpoints")

srun_args=(--nodes="$num_nodes" --ntasks-per-node="$tasks_per_node")
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
if [ -n "${SOFTGRPO_CONTAINER_IMAGE:-}" ]; then
  srun_args+=(--container-image="$SOFTGRPO_CONTAINER_IMAGE" --container-workdir="$PWD")
  if [ -n "${SOFTGRPO_CONTAINER_MOUNTS:-}" ]; then
    srun_args+=(--container-mounts="$SOFTGRPO_CONTAINER_MOUNTS")
  fi
fi
cmd=("${SOFTGRPO_PYTHON:-python3}" -m megatron_softgrpo "${SOFTGRPO_COMMAND:-train}" "$1" "${overrides[@]}")

echo "[launch] $(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $num_nodes node(s) x $tasks_per_node task(s), master $MASTER_ADDR:$MASTER_PORT"
echo "[launch] srun ${srun_args[*]} ${cmd[*]}"
srun "${srun_args[@]}" "${cmd[@]}" &
srun_pid=$!

interrupted=0
forward_preemption() {
  interrupted=1
  echo "[launch] $(date -Is) preemption signal: asking the tasks to checkpoint and exit"
  kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap forward_preemption USR1 TERM
while :; do
  interrupted=0
  rc=0
  wait "$srun_pid" || rc=$?
  [ "$interrupted" = 1 ] || break  # a trapped signal ends `wait` early: wait for srun again
done

if [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
  echo "[launch] $(date -Is) trainer checkpointed for preemption: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "[launch] requeue refused: resubmit with the same checkpointing.checkpoint_dir to resume"
fi
echo "[launch] $(date -Is) srun exit code $rc"
exit "$rc"
