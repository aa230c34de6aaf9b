"""`python -m controller`: the same as `soundedge-controller`."""

import sys

from controller.cli import main

sys.exit(main())
