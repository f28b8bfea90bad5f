"""`python -m coordinator.daemon`: the same as `coordinatord`."""

import sys

from coordinator.daemon.main import main

sys.exit(main())
