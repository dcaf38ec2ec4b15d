#!/usr/bin/env bash
# What a GPU machine runs end to end, with the TensorRT engines of this GPU required throughout
# (--require-tensorrt: "skipped" is a failure here):
#   1. per preset, fp16 and fp32 builds: engines, parity (onnxruntime and TensorRT vs eager PyTorch),
#      run on TensorRT with the plain vision graph (also with torch and transformers unimportable: the
#      runtime needs neither) and with the ApetScore plugin graph (the plugin's enqueue on the GPU: Triton's
#      PTX through the CUDA driver, torch blocked too), bench
#      (onnxruntime, then TensorRT)
#   2. a two-stage build (--stage2-layer 2): engines for llm_a / stage2 / llm_b, parity and run on TensorRT
#      (with torch blocked too)
#   3. calibrated builds (int8 with int8 and int4 weight-only LLMs; fp8 where the GPU has FP8, sm89+):
#      engines for every graph, the quantised LLM included; accuracy parity; run on TensorRT
#   4. the Triton ApetScore kernel against eager torch (scripts/bench_triton_apet.py)
#   5. the TensorRT tests (parse/build, the GPU-only generation test, the stand-in engine tests)
# Every step runs even after an earlier one failed; the script ends with the list of failed steps and
# exits 1 if there is any.
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

FAILED=()
step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
# check NAME COMMAND...: run one step; a failure is recorded and the script goes on
check() {
    local name=$1
    shift
    step "$name"
    if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; FAILED+=("$name"); fi
}

if [ -z "${SKIP_INSTALL:-}" ]; then
    step install
    pip install torch==2.13.0
    pip install -e ".[dev,trt]"
fi

step environment
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
GPU=$(python - <<'PY'
import sys

import torch

from apet_export.compat import import_tensorrt
from apet_export.export.tensorrt import current_gpu_target

trt = import_tensorrt()
print(f"torch {torch.__version__} cuda={torch.cuda.is_available()} gpu={current_gpu_target()}; {trt.__name__} {trt.__version__}",
      file=sys.stderr)
print(current_gpu_target() or "none")
PY
)
echo "GPU target: $GPU"
HAS_FP8=$([ "$GPU" != none ] && [ "${GPU#sm}" -ge 89 ] && echo 1 || echo 0)

step "calibration pictures"
python - "$OUT/images" <<'PY'
import sys
from pathlib import Path
from apet_export.runtime.images import synthetic_image
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
for seed in range(8):
    synthetic_image(seed, (400, 300) if seed % 2 else (300, 400)).save(folder / f"picture-{seed}.png")
print(f"8 pictures in {folder}")
PY

# without_torch COMMAND...: COMMAND where torch, torchvision and transformers cannot be imported (the test
# suite's import blocker on PYTHONPATH); any attempt to import them (a `blocked:` line) fails it too
without_torch() {
    local log rc
    log=$(PYTHONPATH="tests/runtime/torch_blocked${PYTHONPATH:+:$PYTHONPATH}" "$@" 2>&1)
    rc=$?
    echo "$log"
    [ "$rc" -eq 0 ] && ! grep -q '^blocked: ' <<<"$log"
}

engines() {  # engines for this GPU, timed, with their sizes (called in `if`: errexit is off, hence &&)
    /usr/bin/time -f "engine build: %e s wall, %M KiB peak RSS" apet-export engine "$1" --target current "${@:2}" &&
        du -b "$1"/engines/*/*.engine
}

for preset in $PRESETS; do
    # 1. one-stage builds, fp16 and fp32
    for precision in fp16 fp32; do
        dir="$OUT/$preset-$precision"
        check "$preset $precision: build" apet-export build --model "$preset" --precision "$precision" --out "$dir" --force
        check "$preset $precision: engines" engines "$dir" --precision "$precision"
        check "$preset $precision: parity (onnxruntime and tensorrt vs eager)" \
            apet-export parity "$dir" --budgets 16,64,192 --require-tensorrt
        check "$preset $precision: run on tensorrt" \
            apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt
        check "$preset $precision: run on tensorrt without torch" \
            without_torch apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt
        check "$preset $precision: run on tensorrt, ApetScore plugin graph (plugin enqueue), without torch" \
            without_torch apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt --vision-graph plugin
        check "$preset $precision: bench (onnxruntime, then tensorrt)" \
            apet-export bench "$dir" --runs 5 --json-out "$dir/bench.json" --require-tensorrt
    done

    # 2. two-stage: llm_a -> stage2 -> llm_b on TensorRT (LLaVA-style families with a fixed token count)
    dir="$OUT/$preset-two-stage"
    check "$preset two-stage: build" apet-export build --model "$preset" --precision fp16 --stage2-layer 2 --out "$dir" --force
    check "$preset two-stage: engines (llm_a, stage2, llm_b)" engines "$dir"
    check "$preset two-stage: parity" apet-export parity "$dir" --budgets 64 --budget1 96 --budget2 32 --require-tensorrt
    check "$preset two-stage: run on tensorrt (stage 2 keeps 11 = M + 1)" \
        apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt --budget1 96 --budget2 11
    check "$preset two-stage: run on tensorrt without torch" without_torch \
        apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt --budget1 96 --budget2 11
    check "$preset two-stage: bench" apet-export bench "$dir" --runs 3 --budget1 96 --budget2 32 --require-tensorrt

    # 3. calibrated builds: every graph (the quantised LLM included) gets an engine
    source="$OUT/$preset-fp32"
    for variant in int8:8 int8:4 fp8:8; do
        precision=${variant%:*}
        bits=${variant#*:}
        dir="$OUT/$preset-$precision-w$bits"
        check "$preset $precision (LLM weights int$bits): calibrate" apet-export calibrate "$source" --images "$OUT/images" \
            --precision "$precision" --llm-bits "$bits" --samples 8 --out "$dir" --force
        if [ "$precision" = fp8 ] && [ "$HAS_FP8" = 0 ]; then
            step "$preset fp8: engines refused on $GPU (no FP8 hardware), as expected"
            refusal=$(apet-export engine "$dir" --target current 2>&1) || true
            echo "$refusal"
            if grep -q "no FP8 hardware" <<<"$refusal"; then
                echo "ok: refused"
            else
                FAILED+=("$preset fp8 on $GPU was not refused for lack of FP8 hardware")
            fi
            continue
        fi
        check "$preset $precision-w$bits: engines for every graph" engines "$dir"
        check "$preset $precision-w$bits: accuracy parity" apet-export parity "$dir"
        check "$preset $precision-w$bits: run on tensorrt" \
            apet-export run "$dir" --prompt "Describe the image." --max-new-tokens 16 --backend tensorrt
    done
done

# 4. the Triton kernel on the GPU against eager torch (identical basis_index, score difference)
check "Triton ApetScore kernel vs eager torch" python scripts/bench_triton_apet.py --runs 20

# 5. tests: TensorRT parse/build, the GPU generation test, the stand-in engines, the plugin
check "tests: TensorRT and runtime" python -m pytest -q tests/export/test_tensorrt.py tests/runtime tests/plugins/test_trt_plugin.py tests/plugins/test_cuda_launch.py

step done
echo "log: $OUT/e2e.log"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED steps (%d):\n' "${#FAILED[@]}"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
echo "every step passed"
