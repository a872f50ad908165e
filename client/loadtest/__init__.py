"""q8kv-loadtest: the load generator (``python -m q8kv.client.loadtest`` runs it too).

cli.py: flags, the run and the exit status; run.py: the load (virtual orchestrators);
stats.py: latency recording; report.py: the report and /metrics scraping; verify.py: the
local recomputation behind ``--verify``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
