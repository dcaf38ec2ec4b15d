#!/usr/bin/env bash
# What a GPU machine runs end to end: install, build (fp32 and fp16), TensorRT engines for this GPU,
# parity (onnxruntime and TensorRT against eager PyTorch), bench (onnxruntime and TensorRT), the TensorRT tests.
#
#   scripts/gpu_end_to_end.sh [OUT_DIR]          default OUT_DIR=build/gpu-e2e; log in OUT_DIR/e2e.log
#   SKIP_INSTALL=1   use the active environment as it is
#   PRESETS="..."    presets to run (default: both tiny presets; add bench-llava-clip-l-qwen2-0.5b for real sizes)
#
# Needs: an NVIDIA GPU + driver, a CUDA build of torch (plain `pip install torch==2.13.0` on Linux x86-64),
# and TensorRT >= 10.14 (`pip install -e '.[trt]'`, from NVIDIA's index). TensorRT-RTX (in the dev extras)
# runs on RTX/GeForce GPUs (SM75-SM121 consumer/workstation parts), full TensorRT on data-centre GPUs and Jetson.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu-e2e}
PRESETS=${PRESETS:-"tiny-llava tiny-llava-siglip-qwen2"}
mkdir -p "$OUT"
exec > >(tee "$OUT/e2e.log") 2>&1

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
    step install
    pip install torch==2.13.0
    pip install -e ".[dev,trt]"
fi

step environment
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
python - <<'PY'
import torch
from apet_export.compat import import_tensorrt
from apet_export.export.tensorrt import current_gpu_target
trt = import_tensorrt()
print(f"torch {torch.__version__} cuda={torch.cuda.is_available()} gpu={current_gpu_target()}; {trt.__name__} {trt.__version__}")
PY

for preset in $PRESETS; do
    for precision in fp16 fp32; do
        dir="$OUT/$preset-$precision"
        step "$preset $precision: build"
        apet-export build --model "$preset" --precision "$precision" --out "$dir" --force
        step "$preset $precision: engines for this GPU"
        /usr/bin/time -f "engine build: %e s wall, %M KiB peak RSS" \
            apet-export engine "$dir" --target current --precision "$precision"
        du -b "$dir"/engines/*/*.engine
        step "$preset $precision: parity (onnxruntime and tensorrt vs eager torch)"
        apet-export parity "$dir" --budgets 16,64,192 || echo "PARITY FAILED for $dir (see $dir/parity.json)"
        step "$preset $precision: run --backend tensorrt"
        apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt
        step "$preset $precision: bench (onnxruntime, then tensorrt)"
        apet-export bench "$dir" --runs 5 --json-out "$dir/bench.json"
    done
done

step "tests: TensorRT (parse, build, and the GPU-only paths)"
python -m pytest -q tests/export/test_tensorrt.py tests/runtime
step done
echo "log: $OUT/e2e.log"
