# Source this on the GPU machine (device tool) from the repo root:
#   source scripts/device_env.sh
# It installs q8kv as a user would: the wheel of this checkout that `make wheel` built on
# the machine you work on, plus the dependency wheels the GPU machine lacks (README "GPU
# machine"), all carried in .whl/, into /tmp/site (the machine has no network). The tests
# then run from this checkout's tests/ against the installed package.
set -e
if ! ls .whl/q8kv-*.whl >/dev/null 2>&1; then
  echo "device_env.sh: no .whl/q8kv-*.whl: run 'make wheel' first and carry .whl/" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH  # q8kv-server, q8kv-loadtest
export PYTHONUNBUFFERED=1
set +e
