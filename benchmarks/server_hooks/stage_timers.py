"""``server_cpu.py --stages``: the server times its own pieces of a packed call (AttendBatch)
with wrappers around them, and on SIGUSR1 writes each piece's median and mean microseconds
and count to the file Q8KV_BENCH_STAGES names (JSON; the mean counts for pieces that run in
some calls only, such as a quantization-error sample). Wall time, on the event loop: a piece
that awaits (``engine``, ``handler``) includes whatever the loop ran meanwhile. A piece that
does not await also gets its thread's CPU time (``cpu_median_us``): equal to its wall time,
the piece ran the whole time (no lock or GIL waits), so a piece slower here than in a loop
in one process (handler_breakdown.py) runs slower on the CPU itself. Changes nothing unless
Q8KV_BENCH_STAGES is set.

The pieces: ``decode_batch`` (parse checks, finiteness), ``engine`` (Engine.attend_batch)
and within it ``prepare_packed`` (per-session checks, length moves) and ``attend_packed``
(the backend; on cupy also ``pack_packed``, ``upload_launch``, ``download`` with the GPU
wait, ``kernel_metrics``), ``sample_quantization``, ``serialize`` (the answer's bytes) and
``handler`` (the servicer method in all).
"""

import os

STAGES_FILE = os.environ.get("Q8KV_BENCH_STAGES")

if STAGES_FILE:
    import functools
    import json
    import signal
    import statistics
    import time

    from q8kv.server.backends import numpy_backend
    from q8kv.server.engine import appends, operations
    from q8kv.server.observability import metrics
    from q8kv.server.rpc import servicer

    _TIMES: dict[str, list[float]] = {}
    _CPU: dict[str, list[float]] = {}  # the thread's CPU seconds of the pieces that never await

    def _timed(name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _TIMES.setdefault(name, []).append(time.perf_counter() - started)
                _CPU.setdefault(name, []).append(time.thread_time() - cpu)

        return timed

    def _timed_async(name, fn):
        @functools.wraps(fn)
        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                _TIMES.setdefault(name, []).append(time.perf_counter() - started)

        return timed

    def _wrap(owner, attr: str, name: str, asynchronous: bool = False) -> None:
        wrap = _timed_async if asynchronous else _timed
        setattr(owner, attr, wrap(name, getattr(owner, attr)))

    _wrap(servicer, "decode_batch", "decode_batch")
    _wrap(servicer, "attend_batch_response", "serialize")
    _wrap(servicer.KVCacheService, "AttendBatch", "handler", asynchronous=True)
    _wrap(operations.Engine, "attend_batch", "engine", asynchronous=True)
    _wrap(appends, "prepare_packed", "prepare_packed")
    _wrap(metrics.Metrics, "sample_quantization", "sample_quantization")
    _wrap(numpy_backend.NumpyBackend, "attend_packed", "attend_packed")
    try:
        from q8kv.server.backends.cupy import backend as cupy_backend
    except ImportError:  # no CuPy here: the numpy backend's pieces only
        cupy_backend = None
    if cupy_backend is not None:
        _wrap(cupy_backend.CupyBackend, "attend_packed", "attend_packed")
        _wrap(cupy_backend, "pack_packed", "pack_packed")
        _wrap(cupy_backend.CupyBackend, "_run", "upload_launch")
        _wrap(cupy_backend.CupyBackend, "_download", "download")
        _wrap(cupy_backend.CupyBackend, "_report", "kernel_metrics")

    def _write(*_signal) -> None:
        medians = {
            name: {
                "median_us": statistics.median(times) * 1e6,
                "mean_us": statistics.fmean(times) * 1e6,
                "count": len(times),
            }
            for name, times in _TIMES.items()
        }
        for name, cpu in _CPU.items():
            medians[name]["cpu_median_us"] = statistics.median(cpu) * 1e6
        with open(STAGES_FILE, "w") as f:
            json.dump(medians, f)

    signal.signal(signal.SIGUSR1, _write)
