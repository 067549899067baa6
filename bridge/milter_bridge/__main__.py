"""``python -m milter_bridge`` is the ``milter-bridge`` command."""

import sys

from milter_bridge.cli import main

sys.exit(main())
