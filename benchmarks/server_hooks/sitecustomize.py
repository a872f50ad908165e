"""Hooks a benchmark puts into the q8kv server it starts (never the service itself): Python
imports this file at start-up when its folder is on PYTHONPATH (``bench_util``'s
``server_hooks``). Each hook changes nothing unless its variable is set:

- ``Q8KV_BENCH_CANNED=1``: the numpy backend answers at once (canned_backend.py);
- ``Q8KV_BENCH_STAGES=FILE``: the server times its own pieces and writes their medians to
  FILE on SIGUSR1 (stage_timers.py).
"""

import canned_backend  # noqa: F401 - installs itself when asked
import stage_timers  # noqa: F401 - installs itself when asked
