"""`python -m dfq ...` (and `torchrun -m dfq ...`): the same command as `dfq`."""

import sys

from dfq.cli import main

sys.exit(main())
