"""`python -m edge` is `soundedge`."""

import sys

from edge.cli import main

sys.exit(main())
