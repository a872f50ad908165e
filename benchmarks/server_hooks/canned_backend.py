"""``--canned-backend`` (batch_path.py, server_cpu.py): a q8kv server whose numpy backend
answers every AppendAndAttend item and AttendBatch with zeros of the right shape and dtype
at once, without quantizing or reading its pool. The engine still checks, reserves pages and
moves lengths, so what is left is the front end, the engine's bookkeeping and the
transport: the part of a call a faster backend cannot remove. Changes nothing unless
Q8KV_BENCH_CANNED is 1."""

import os

if os.environ.get("Q8KV_BENCH_CANNED") == "1":
    import numpy as np

    from q8kv.server.backends import numpy_backend

    def _attend_packed(self, batch):
        lay = batch.layout
        return np.zeros((batch.size, batch.n, lay.num_heads, lay.head_dim), batch.out_dtype)

    def _append_and_attend(self, items):
        return [
            np.zeros((it.n, it.layout.num_heads, it.layout.head_dim), it.out_dtype) for it in items
        ]

    numpy_backend.NumpyBackend.attend_packed = _attend_packed
    numpy_backend.NumpyBackend.append_and_attend = _append_and_attend
