"""What q8kv-loadtest records about each call, and the summary figures of its report.

Every call's latency goes into a Recorder; counts, sums and extremes are exact, while the
per-call samples used for percentiles, the histogram, the CSV and the plot are kept in full
up to ``MAX_SAMPLES`` calls and sampled uniformly beyond (reservoir sampling), so a long
run has bounded memory and still unbiased percentiles.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_SAMPLES = 2_000_000
MAX_ERROR_MESSAGES = 10
KINDS = ("prefill", "decode")


@dataclass
class Sample:
    """One call as the CSV and the plot see it."""

    start_s: float  # seconds since the timed phase began
    latency_s: float
    kind: str
    status: str


class Reservoir(Generic[T]):
    """Every value up to ``cap``; beyond, a uniform sample of ``cap`` of them (Algorithm R)."""

    def __init__(self, rng: random.Random, cap: int = MAX_SAMPLES) -> None:
        self.values: list[T] = []
        self.seen = 0
        self._rng = rng
        self._cap = cap

    def add(self, value: T) -> None:
        self.seen += 1
        if len(self.values) < self._cap:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self._cap:
            self.values[slot] = value


@dataclass
class KindStats:
    """Exact totals of one kind of call (prefill or decode)."""

    count: int = 0
    ok: int = 0
    items: int = 0
    tokens: int = 0
    latency_sum: float = 0.0
    fastest: float = math.inf
    slowest: float = 0.0
    latencies: Reservoir[float] | None = None

    def summary(self) -> dict[str, float]:
        values = self.latencies.values if self.latencies else []
        return latency_summary(values, self.latency_sum, self.count, self.fastest, self.slowest)


class Recorder:
    """Collects every timed call. Single-threaded: only the event loop calls it."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.kinds = {kind: KindStats(latencies=Reservoir(rng)) for kind in KINDS}
        self.codes: Counter[str] = Counter()
        self.errors: dict[tuple[str, str], int] = {}  # first distinct (code, message) -> count
        self.samples: Reservoir[Sample] = Reservoir(rng)
        self.latency_sum = 0.0
        self.fastest = math.inf
        self.slowest = 0.0

    def record(
        self, kind: str, start_s: float, latency_s: float, items: int, tokens: int,
        status: str = "OK", message: str = "",
    ) -> None:
        stats = self.kinds[kind]
        stats.count += 1
        stats.latency_sum += latency_s
        stats.fastest = min(stats.fastest, latency_s)
        stats.slowest = max(stats.slowest, latency_s)
        assert stats.latencies is not None
        stats.latencies.add(latency_s)
        self.codes[status] += 1
        self.latency_sum += latency_s
        self.fastest = min(self.fastest, latency_s)
        self.slowest = max(self.slowest, latency_s)
        if status == "OK":
            stats.ok += 1
            stats.items += items
            stats.tokens += tokens
        else:
            key = (status, message)
            if key in self.errors or len(self.errors) < MAX_ERROR_MESSAGES:
                self.errors[key] = self.errors.get(key, 0) + 1
        self.samples.add(Sample(start_s, latency_s, kind, status))

    # -- totals ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return sum(s.count for s in self.kinds.values())

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.kinds.values())

    @property
    def items(self) -> int:
        return sum(s.items for s in self.kinds.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.kinds.values())

    def all_latencies(self) -> list[float]:
        return [s.latency_s for s in self.samples.values]

    def summary(self) -> dict[str, float]:
        return latency_summary(
            self.all_latencies(), self.latency_sum, self.count, self.fastest, self.slowest
        )


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (as ghz and wrk report): the smallest value with at least p%
    of the samples at or below it."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(
    values: list[float], total: float | None = None, count: int | None = None,
    fastest: float | None = None, slowest: float | None = None,
) -> dict[str, float]:
    """fastest/mean/p50/p90/p95/p99/slowest in milliseconds. Exact ``total``/``count``/
    extremes may be passed in when ``values`` is a sample."""
    ordered = sorted(values)
    n = count if count is not None else len(ordered)
    if not n:
        return {k: 0.0 for k in ("fastest", "mean", "p50", "p90", "p95", "p99", "slowest")}
    mean = (total if total is not None else math.fsum(ordered)) / n
    return {
        "fastest": 1e3 * (fastest if fastest is not None else ordered[0]),
        "mean": 1e3 * mean,
        "p50": 1e3 * percentile(ordered, 50),
        "p90": 1e3 * percentile(ordered, 90),
        "p95": 1e3 * percentile(ordered, 95),
        "p99": 1e3 * percentile(ordered, 99),
        "slowest": 1e3 * (slowest if slowest is not None else ordered[-1]),
    }


def histogram(values: list[float], buckets: int = 10) -> list[dict[str, float]]:
    """ghz-style: ``buckets`` equal-width bins from the fastest to the slowest call, each
    labelled by its upper edge in milliseconds."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / buckets
    counts = [0] * buckets
    for value in values:
        index = buckets - 1 if width == 0 else min(int((value - lo) / width), buckets - 1)
        counts[index] += 1
    return [
        {"le_ms": 1e3 * (lo + width * (i + 1) if width else hi), "count": c}
        for i, c in enumerate(counts)
    ]
