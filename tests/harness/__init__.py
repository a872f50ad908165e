"""What the tests share, one module per concern (pytest puts ``tests/`` on ``sys.path``, so
tests import ``from harness.server import ServerProcess``):

- ``server``: the ``q8kv-server`` subprocess on loopback (plaintext or TLS), free ports.
- ``scrape``: the /metrics endpoint, fetched and parsed.
- ``tensors``: random q/k/v (never zeros) for any geometry.
- ``geometry``: one session geometry type and the page arithmetic tests check against.
- ``rpc``: raw gRPC stubs, bearer metadata, AttendItems, a raw-stub driver.
- ``sessions``: fill a client session with random tokens, read its caches back.
- ``engine``: hold an Engine's worker busy so queued calls meet in one batch.
- ``logs``: wait for a line in a server's log.
- ``proc``: /proc readings (resident memory, listening ports) and stopping a child process.
- ``kernel_plans``: uncompiled stand-ins of the GPU kernels, for launch-planning tests.
- ``sdpa``: torch SDPA over a dequantized cache with q8kv's causal mask (GPU prefill tests).

The benchmarks keep their own helpers: they never import the tests.
"""
