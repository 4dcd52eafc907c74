#!/usr/bin/env bash
# The GPU checks of the fast path (issue 7) and of pruned-network latency (issue 9) in one run on a lent GPU
# machine, within one device call (about 9 minutes at most). That machine has torch, pytest, onnx(runtime), rich and
# scikit-learn but no registry: `make device-wheels` puts what it lacks in .whl/, which the call carries.
#
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/device_check.sh
#
# Each part runs under its own time limit, so one that hangs or fails leaves the others their time; its whole log
# and figures (JSON) land in $OUT (./device-out outside the device tool) and its tail is printed.
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 COLUMNS=150 PYTHONPATH=$PWD
python=${PYTHON:-python3}

if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi

part() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - started))s; last lines:"
    tail -n "${TAIL_LINES:-45}" "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import torch, torch_pruning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

part cuda_tests 200 "$python" -m pytest -q -p no:cacheprovider -n 3 -rs \
    tests/test_step.py tests/test_latency.py tests/test_checkpoint.py tests/test_runtime.py -k "cuda or graph"
part tpp_overhead 230 "$python" benchmarks/tpp_overhead.py --device cuda --models resnet56 resnet50 --steps 32 \
    --json "$out/tpp_overhead.json"
part pruned_latency 120 "$python" benchmarks/pruned_latency.py --device cuda --networks resnet50_2.31x resnet56_0.9 \
    --targets eager graph --json "$out/pruned_latency.json"
