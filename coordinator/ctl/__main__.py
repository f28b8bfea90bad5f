"""`python -m coordinator.ctl`: the same as `coordinatorctl`."""

import sys

from coordinator.ctl.main import main

sys.exit(main())
