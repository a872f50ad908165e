"""The host cost of one prefill layer's messages, in-process (no network, no backend): the
client builds and serializes the AppendAndAttend request, the server parses it, decodes
and checks the tensors, encodes the answer and serializes it, the client parses and decodes
it. These are the parts of a prefill's service time that neither the GPU nor the transport
accounts for (benchmarks/prefill_service.py splits a rep into device, transport and the
rest). Median seconds over --reps.

Also the metrics' quantization-error sample of the layer's k/v (when an item is drawn,
1 in 1,000 by default, on the event loop): as the server takes it (at most
metrics.SAMPLE_TOKENS tokens), and over the whole item, as it was before that bound.

    .venv/bin/python benchmarks/prefill_messages.py [--tokens 8192] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from q8kv.client import messages as client_messages
from q8kv.server.observability.metrics import SAMPLE_TOKENS, quantization_error
from q8kv.server.rpc import messages as server_messages
from q8kv.v1 import kvcache_pb2 as pb


def one_layer(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, float]:
    times: dict[str, float] = {}

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        times[name] = time.perf_counter() - started
        return value

    def build() -> bytes:
        request = pb.AppendAndAttendRequest()
        client_messages.batch_items([("s", 0, q, k, v)], request.items)
        return request.SerializeToString()

    wire_request = timed("client_build_serialize", build)
    request = timed("server_parse", lambda: pb.AppendAndAttendRequest.FromString(wire_request))
    decoded = timed("server_decode_check", lambda: server_messages.decode_items(request.items))
    out = q.copy()  # the backend's answer: [n, H, D] in q's dtype

    def answer() -> bytes:
        return b"".join(server_messages.attend_response(decoded, [(out, len(q))]))

    wire_response = timed("server_encode_serialize", answer)
    response = timed("client_parse", lambda: pb.AppendAndAttendResponse.FromString(wire_response))
    timed("client_decode", lambda: client_messages.decode_results(response.results))
    timed("quant_sample", lambda: quantization_error(k[:SAMPLE_TOKENS], v[:SAMPLE_TOKENS]))
    timed("quant_sample_whole_item", lambda: quantization_error(k, v))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.tokens, args.head_dim
    q, k, v = (
        rng.standard_normal((n, h, d), dtype=np.float32).astype(np.float16)
        for h in (args.heads, args.kv_heads, args.kv_heads)
    )
    runs = [one_layer(q, k, v) for _ in range(args.reps + 1)][1:]
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    messages = [key for key in runs[0] if not key.startswith("quant_sample")]
    medians["total"] = statistics.median(sum(r[key] for key in messages) for r in runs)
    mib = (q.nbytes + k.nbytes + v.nbytes) / 2**20
    print(json.dumps({"tokens": n, "request_mib": mib, "answer_mib": q.nbytes / 2**20,
                      "median_s": {key: round(s, 4) for key, s in medians.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
