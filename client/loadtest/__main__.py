"""``python -m q8kv.client.loadtest``: the same as the ``q8kv-loadtest`` command."""

import sys

from .cli import main

sys.exit(main())
