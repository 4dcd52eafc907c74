#!/usr/bin/env bash
# The GPU checks in one run on a lent GPU machine, within one device call (9 minutes at most, the parts' limits
# summed): the CUDA-only tests (captured and compiled steps equal eager, the GPU-resident loader's draws equal its
# CPU draws bit for bit, the graph and compile latency targets), the stages end to end on CUDA (graph step, device
# loader, CIFAR-shaped files: TPP's removal within 1 point, evaluate with every latency target), and the TPP-overhead
# and pruned-latency benchmarks. That machine has torch, pytest, onnx(runtime), rich and scikit-learn but no
# registry, DVC or MLflow: `make device-wheels` puts what the code needs in .whl/, which the call carries; the
# stage check switches tracking off (it shapes no output).
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

part cuda_tests 150 "$python" -m pytest -q -p no:cacheprovider -n 3 -rs \
    tests/test_step.py tests/test_latency.py tests/test_checkpoint.py tests/test_runtime.py \
    tests/test_device_loader.py -k "cuda or graph"
part cuda_stages 170 "$python" benchmarks/cuda_stages.py --device cuda --step graph --json "$out/cuda_stages.json"
part tpp_overhead 130 "$python" benchmarks/tpp_overhead.py --device cuda --models resnet56 resnet50 --steps 16 \
    --json "$out/tpp_overhead.json"
part pruned_latency 70 "$python" benchmarks/pruned_latency.py --device cuda --networks resnet50_2.31x resnet56_0.9 \
    --targets eager graph --repeats 15 --json "$out/pruned_latency.json"
