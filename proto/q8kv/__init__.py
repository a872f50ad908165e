"""q8kv: LLM KV caches in a Q8 block format, with attention over them, as a gRPC service.

This folder is the contract both sides share: ``q8kv.v1`` (kvcache.proto and its generated
stubs), ``q8kv.wire`` (numpy arrays <-> Tensor messages, with their checks) and
``q8kv.format`` (the Q8 block math and the page layout). None of them imports the server or
the client; ``q8kv.wire`` imports only ``q8kv.v1``. The server and the client live in the
repository's top-level ``server/`` and ``client/`` folders and are installed as
``q8kv.server`` and ``q8kv.client`` (pyproject.toml maps them).
"""
