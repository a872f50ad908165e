"""``python -m q8kv.server``: the same as the ``q8kv-server`` command."""

import sys

from .app import main

sys.exit(main())
