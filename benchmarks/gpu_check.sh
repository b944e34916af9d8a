#!/usr/bin/env bash
# GPU check for issue 5, run on the lent GPU machine from the repository root:
#   benchmarks/gpu_check.sh [STEP ...]
# STEPs (default: env build cuda): env, build, cuda (GPU + kernel tests),
# suite (the whole test suite), gpubench (benchmarks/gpu_bench.py), bench
# (fastnn-bench --device cuda), train (MNIST LeNet-5 on the GPU).
# Logs go to $OUT (default /tmp/gpu_out). MNIST is read from $FASTNN_DATA
# (default .gpudata, a git-ignored copy carried to the machine).
set -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # scripts under benchmarks/ import fastnn from here
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export FASTNN_DATA=${FASTNN_DATA:-$PWD/.gpudata}
PY=${PY:-python3}
status=0
steps=${*:-env build cuda}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S)) ===" | tee -a "$OUT/summary.log"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    echo "=== $name rc=$rc" | tee -a "$OUT/summary.log"
    [ $rc -ne 0 ] && status=1
    return 0
}

for s in $steps; do
    case $s in
    env)
        step env 60 bash -c "nvidia-smi; $PY -c 'import sys, numpy, cupy, torch; \
print(sys.version); print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__, \"torch\", torch.__version__, \"torch cuda\", torch.version.cuda); \
print(\"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion(), \"driver api\", cupy.cuda.runtime.driverGetVersion()); \
print(\"cudnn\", torch.backends.cudnn.version(), \"device\", cupy.cuda.runtime.getDeviceProperties(0)[\"name\"])'; nproc"
        ;;
    build)
        step build 300 $PY setup.py build_ext --inplace -j 16
        ;;
    cuda)
        step cuda 300 $PY -m pytest tests/test_cuda.py tests/test_cuda_layers.py tests/test_kernels.py -q -rs -p no:cacheprovider
        ;;
    suite)
        step suite 420 $PY -m pytest -q -rs -p no:cacheprovider --timeout 300
        ;;
    gpubench)
        step gpubench 300 $PY benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" --data "$FASTNN_DATA/mnist"
        ;;
    conv)
        step conv 120 $PY benchmarks/gpu_bench.py --skip-lenet --json "$OUT/gpu_conv.json"
        ;;
    bench)
        step bench 300 $PY -m fastnn.bench --device cuda --json "$OUT/bench_cuda.json"
        ;;
    train)
        step train 300 $PY -m fastnn.train mnist-lenet --device cuda --data "$FASTNN_DATA/mnist"
        ;;
    *)
        echo "unknown step $s"; status=1
        ;;
    esac
done
cat "$OUT/summary.log"
exit $status
