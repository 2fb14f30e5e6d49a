#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (run from the repository root, dori installed):
#
#     bash benchmarks/gpu_checks.sh
#
# 1. `pytest -m gpu`: every stage on CUDA against the CPU (tests/test_gpu.py);
# 2. NeMo's candidate checks: the reference procedure, sequential+replay (dori's default) and
#    batched+replay (16 checks per UNet call): neuron sets and speed-ups (issue 3);
# 3. the cost of one DoRI step relative to a bare UNet forward+backward, and the time per image (issue 4).
# Exits non-zero when any of them failed.
set -uo pipefail
rc=0
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "== pytest -m gpu"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider || rc=1
echo "== python benchmarks/nemo_batched.py --prompts 8 --device cuda"
python3 benchmarks/nemo_batched.py --prompts 8 --device cuda || rc=1
echo "== python benchmarks/dori_step.py --device cuda"
python3 benchmarks/dori_step.py --device cuda || rc=1
exit $rc
