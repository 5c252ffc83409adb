#!/usr/bin/env bash
# Every GPU check and benchmark in one run (issue 8), on a lent H100/H200 with no network:
#   device run: bash benchmarks/gpu/run.sh [STEP...]   (carry .whl and .gpu_assets; results in $OUT)
# With STEP names (rollout_static check_cuda logprob update rollout_batch64 update_fused_swiglu)
# only those run.
# .whl holds the wheels the device image lacks (megatron-core 0.16.1, pydantic for Python 3.12);
# .gpu_assets/tokenizer the SmolLM2 tokenizer files the rollout benchmark decodes with.
set -o pipefail
OUT="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', m.__version__)"
  python3 -c "import transformer_engine.pytorch" 2>&1 | tail -1 | sed 's/^/transformer_engine: /'
} 2>&1 | tee "$OUT/env.txt"
SELECTED=" $* "
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  [[ "$SELECTED" == "  " || "$SELECTED" == *" $name "* ]] || return 0
  echo "== $name" | tee -a "$OUT/bench.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/bench.txt"
  echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/bench.txt"
}
# most important first: a run cut short by the device budget keeps what finished
# issue 14: the static engine with CUDA graphs (never run on a GPU yet), 1.5B shape, batch 64
step rollout_static 300 python3 benchmarks/rollout.py --static-gpu --model qwen2-1.5b-random \
  --tokenizer .gpu_assets/tokenizer --json "$OUT/rollout_static.json"
step check_cuda 60 python3 benchmarks/gpu/check_cuda.py --json "$OUT/check_cuda.json"
step logprob 100 python3 benchmarks/logprob.py
step update 150 python3 benchmarks/update.py --rows 4 --seq-len 4096 --profile --json "$OUT/update.json"
step rollout_batch64 120 python3 benchmarks/rollout.py --throughput-only --new-tokens 64 --model qwen2-1.5b-random \
  --tokenizer .gpu_assets/tokenizer --json "$OUT/rollout_batch64.json"
step update_fused_swiglu 100 python3 benchmarks/update.py --rows 4 --seq-len 4096 --megatron bias_activation_fusion=true \
  --json "$OUT/update_fused_swiglu.json"
