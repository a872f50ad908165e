# Source this on the GPU machine (device tool) from the repo root:
#   source scripts/device_env.sh
# It installs the carried wheels (.whl/, see README "GPU machine") into /tmp/site and makes
# `import q8kv.*` work from this checkout without pip (the machine has no network):
# q8kv is a namespace package whose subpackages are the repo's top-level folders.
set -e
REPO_ROOT=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/q8kv-src/q8kv
ln -sfn "$REPO_ROOT/server" /tmp/q8kv-src/q8kv/server
ln -sfn "$REPO_ROOT/client" /tmp/q8kv-src/q8kv/client
ln -sfn "$REPO_ROOT/proto/q8kv/v1" /tmp/q8kv-src/q8kv/v1
# Package metadata, so importlib.metadata.version("q8kv") answers as after a pip install.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
mkdir -p "/tmp/q8kv-src/q8kv-${version}.dist-info"
printf 'Metadata-Version: 2.1\nName: q8kv\nVersion: %s\n' "$version" \
  > "/tmp/q8kv-src/q8kv-${version}.dist-info/METADATA"
export PYTHONPATH=/tmp/q8kv-src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
set +e
