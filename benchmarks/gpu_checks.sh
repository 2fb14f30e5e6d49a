#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (run from the repository root, dori installed):
#
#     bash benchmarks/gpu_checks.sh
#
# 1. `pytest -m gpu`: every stage on CUDA against the CPU (tests/test_gpu.py);
# 2. NeMo's candidate checks: the reference procedure, sequential+replay and batched+replay (CUDA's
#    default, 16 checks per UNet call), same neurons, and the speed-ups (issue 3);
# 3. the cost of one DoRI step relative to a bare UNet forward+backward, and the time per image (issue 4).
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "== pytest -m gpu"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
echo "== python benchmarks/nemo_batched.py --prompts 8 --device cuda"
python3 benchmarks/nemo_batched.py --prompts 8 --device cuda
echo "== python benchmarks/dori_step.py --device cuda"
python3 benchmarks/dori_step.py --device cuda
