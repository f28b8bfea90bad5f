"""`python -m coordinator.daemon`: the same as `coordinatord`."""

import sys

from coordinator.daemon.service import main

sys.exit(main())
