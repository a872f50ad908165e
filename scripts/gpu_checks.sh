#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with .whl/ carried (`make wheel`
# puts this checkout's q8kv wheel there; README "GPU machine" lists the other wheels):
#   bash scripts/gpu_checks.sh tests   # GPU unit tests + the end-to-end suites on --backend cupy
#   bash scripts/gpu_checks.sh bench   # kernel, service-latency and throughput benchmarks
# Logs and JSON results go to $OUT (or ./.out).
set -uo pipefail
source scripts/device_env.sh || exit 1
OUT=${OUT:-.out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
case "${1:-tests}" in
  tests)
    python3 -c 'import q8kv.server; print("q8kv from", q8kv.server.__file__)' | tee "$OUT/tests.log"
    python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_cupy_host.py 2>&1 \
      | tee -a "$OUT/tests.log" | tail -3
    # Every suite, each server it starts on the GPU backend. (Prometheus, nginx and Docker
    # suites need those programs, which the GPU machine lacks; they run in CI. test_hf needs
    # the SmolLM2 GGUF, a 94 MB wheel that does not travel: Q8KV_HF_MODEL_DIR points it at
    # a copied .gguf where one is there.)
    Q8KV_TEST_BACKEND=cupy python3 -m pytest -q -p no:cacheprovider tests \
      --ignore=tests/gpu --ignore=tests/test_prometheus.py --ignore=tests/test_containers.py \
      --ignore=tests/test_router.py --ignore=tests/test_deploy_config.py \
      --ignore=tests/test_soak.py --ignore=tests/test_hf.py 2>&1 | tee -a "$OUT/tests.log" | tail -12
    ;;
  bench)
    # The packed path against a gRPC echo of its bytes, prefill interference, replicas per
    # GPU behind nginx (carry .deb/ from scripts/fetch_nginx_debs.sh), the handler's pieces,
    # prefill.
    python3 benchmarks/batch_path.py --backend cupy --out "$OUT" 2>&1 \
      | tee "$OUT/bench.log" | tail -30
    python3 benchmarks/prefill_interference.py --backend cupy --decoders 64 --prompt 8192 \
      --heads 32 --kv-heads 8 --head-dim 128 --length 1024 --seconds 6 --out "$OUT" 2>&1 \
      | tee -a "$OUT/bench.log" | tail -4
    python3 benchmarks/multiprocess.py --backend cupy --total-budget 64GiB --seconds 8 \
      --nginx-deb-dir .deb --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -8
    python3 benchmarks/handler_breakdown.py --backend cupy 2>&1 | tee -a "$OUT/bench.log" \
      | tail -16
    # Prefill: the kernels vs torch SDPA and one call's wall time (adds prefill_rows to
    # $OUT/kernels-<card>.json), then a whole prompt through the service vs a gRPC echo.
    (cd benchmarks && python3 prefill.py --out "$OUT") 2>&1 | tee -a "$OUT/bench.log" | tail -8
    python3 benchmarks/prefill_service.py --backend cupy --rpc append --out "$OUT" 2>&1 \
      | tee -a "$OUT/bench.log" | tail -4
    ;;
esac
