"""q8kv-loadtest: the load generator (``python -m q8kv.client.loadtest`` runs it too).

cli.py: the run and the exit status; flags.py: the flags and their checks; run.py: the
load (virtual orchestrators), microbatch.py: one micro-batch's loop, state.py: the spec and
the state they share; stats.py: latency recording; report.py: the report and /metrics
scraping; verify.py: the local recomputation behind ``--verify``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
