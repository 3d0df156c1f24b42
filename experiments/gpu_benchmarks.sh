#!/usr/bin/env bash
# Every accelerator benchmark of jaxdet, in two bounded parts that each fit one 10-minute call
# on the GPU machine; logs and JSON go under OUT.
#
#   bash experiments/gpu_benchmarks.sh --fetch-wheels   # once, on a machine with PyPI: .whl/
#   bash experiments/gpu_benchmarks.sh a OUT            # ops, backbones, YOLO, torchvision tests
#   bash experiments/gpu_benchmarks.sh b OUT            # Fast / Faster R-CNN, the speedup table
#   bash experiments/gpu_benchmarks.sh small OUT        # every script at its CPU size (smoke)
#
# The GPU image has JAX, flax, optax, orbax, torch and torchvision but not ml_collections,
# tensorboardX or pycocotools (our configs, writers and COCO reference): --fetch-wheels
# downloads those three (under 1 MB, for that image's Python 3.12) into .whl/ (ignored by
# git); carry .whl to the device and this script installs them into /tmp/site. OpenCV contrib
# (selective search) is too large to carry (about 70 MB): there the speedup table reports
# selective search as not timed, and bench_rcnn --mode paper is left out.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl ml_collections tensorboardX pycocotools
fi

part="${1:?usage: gpu_benchmarks.sh a|b|small OUT}"
out="${2:?usage: gpu_benchmarks.sh a|b|small OUT}"
case "$part" in
  a|b|small) ;;
  *) echo "part: expected a, b or small, got '$part'" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import jax, sys; print('jax', jax.__version__, jax.devices(), sys.version)" \
  | tee "$out/devices.txt"

status=0
bench() {   # bench NAME SECONDS ARGS...: one command, bounded, its output in OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

case "$part" in
  a)
    bench ops 150 python3 -m experiments.bench_ops --out "$out/ops.json"
    bench backbones 150 python3 -m experiments.bench_backbones
    bench yolo 90 python3 -m experiments.bench_yolo --out "$out/yolo.json"
    bench torchvision_tests 150 python3 -m pytest -q -p no:cacheprovider \
      tests/ops/test_torchvision_ops.py tests/models/test_torch_weights.py
    ;;
  b)
    bench fast_rcnn 180 python3 -m experiments.bench_fast_rcnn --out "$out/fast_rcnn.json"
    bench faster_rcnn 180 python3 -m experiments.bench_faster_rcnn --out "$out/faster_rcnn.json"
    bench speedups 200 python3 -m experiments.bench_speedups --out "$out/speedups"
    ;;
  small)
    bench ops 300 python3 -m experiments.bench_ops --tiny --out "$out/ops.json"
    bench yolo 120 python3 -m experiments.bench_yolo --small --out "$out/yolo.json"
    bench fast_rcnn 300 python3 -m experiments.bench_fast_rcnn --small --repeats 2 \
      --train-steps 2 --out "$out/fast_rcnn.json"
    bench faster_rcnn 300 python3 -m experiments.bench_faster_rcnn --small --repeats 2 \
      --out "$out/faster_rcnn.json"
    bench speedups 300 python3 -m experiments.bench_speedups --small --repeats 2 \
      --out "$out/speedups"
    ;;
esac
exit "$status"
