#!/usr/bin/env bash
# The GPU checks and benchmarks, on a lent H100/H200 (Python 3.12, CUDA torch, no network).
# First, here (a machine with the package registries): bash benchmarks/gpu/prepare.sh
# (builds the git-ignored .whl/ and .gpu_assets/). Then on the device, carrying both:
#   run(command="bash benchmarks/gpu/run.sh [STEP...]", carry=[".whl", ".gpu_assets"], timeout_s=600)
# Steps, most important first (no STEP: all of them, in this order, while the budget lasts):
#   graphs               CUDA-graph replay = no graphs = Megatron's forward (tiny model, ~30 s)
#   rollout_static       the fixed-shape backend with graphs (as training runs it), then without;
#                        step vs roofline, 1.5B shape, batch 64 (each number written when measured)
#   check_cuda logprob update rollout_batch64 update_fused_swiglu   (the earlier sessions' set)
#   update_losses        SofT-GRPO's update with each issue-28 loss option, alternating (1.5B shape)
# Each step starts only if its time limit fits in what is left of RUN_BUDGET_S (default 540 s,
# under the device's 600 s a command), so a call never runs over; skipped steps are named at
# the end for the next call. Give that call a RUN_BUDGET_S under the device time then left (with
# 270 s left: RUN_BUDGET_S=240 bash benchmarks/gpu/run.sh STEP...): the device stops a command
# there, and a step stopped loses its last numbers. Output is unbuffered and unfiltered;
# $OUT/log.txt gets every line as it is printed, and each step that writes JSON writes
# $OUT/STEP.json as results come (the device returns at most 8 files: log.txt + one per step).
set -o pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/gpu/out}"
BUDGET="${RUN_BUDGET_S:-540}"
SITE="${RUN_SITE:-/tmp/site}"  # where the wheels install (the tests point it into their own folder)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore  # Megatron's import warnings: noise, not results
if ! ls .whl/*.whl >/dev/null 2>&1 || [ ! -d .gpu_assets/tokenizer ]; then
  echo "no .whl/ or .gpu_assets/: run benchmarks/gpu/prepare.sh where pip works, then carry both" | tee -a "$LOG"
  exit 2
fi
# offline, into a separate target: the image's torch, numpy and transformers stay as they are;
# a warm machine that has installed these wheels already skips it
stamp=$(ls .whl | sha1sum | cut -c1-12)
if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$stamp" ]; then
  python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir \
    --root-user-action=ignore --upgrade --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG" || exit 1
  mkdir -p "$SITE" && echo "$stamp" >"$SITE/.wheels"
fi
export PYTHONPATH="$SITE:$PWD"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', m.__version__)"
  python3 -c "import transformer_engine.pytorch" 2>&1 | tail -1 | sed 's/^/transformer_engine: /'
} 2>&1 | tee -a "$LOG"

SELECTED=" $* "
SKIPPED=()
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  [[ "$SELECTED" == "  " || "$SELECTED" == *" $name "* ]] || return 0
  if ((SECONDS + limit > BUDGET)); then
    SKIPPED+=("$name")
    echo "== $name: skipped (limit ${limit} s, $((BUDGET - SECONDS)) s left)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name ($(date -u +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
}
TOK=(--tokenizer .gpu_assets/tokenizer)
step graphs 120 python3 benchmarks/gpu/check_graphs.py "${TOK[@]}" --json "$OUT/graphs.json"
step rollout_static 300 python3 benchmarks/rollout.py --static-gpu --model qwen2-1.5b-random \
  "${TOK[@]}" --json "$OUT/rollout_static.json"
step check_cuda 60 python3 benchmarks/gpu/check_cuda.py "${TOK[@]}" --json "$OUT/check_cuda.json"
step logprob 100 python3 benchmarks/logprob.py
step update 150 python3 benchmarks/update.py --rows 4 --seq-len 4096 --profile --json "$OUT/update.json"
step rollout_batch64 120 python3 benchmarks/rollout.py --throughput-only --new-tokens 64 \
  --model qwen2-1.5b-random "${TOK[@]}" --json "$OUT/rollout_batch64.json"
step update_fused_swiglu 100 python3 benchmarks/update.py --rows 4 --seq-len 4096 \
  --megatron bias_activation_fusion=true --json "$OUT/update_fused_swiglu.json"
step update_losses 150 python3 benchmarks/update.py --rows 4 --seq-len 4096 --loss-variants \
  --json "$OUT/update_losses.json"
if ((${#SKIPPED[@]})); then
  echo "== not run (budget): next call: bash benchmarks/gpu/run.sh ${SKIPPED[*]}" | tee -a "$LOG"
fi
echo "== done in ${SECONDS} s" | tee -a "$LOG"
