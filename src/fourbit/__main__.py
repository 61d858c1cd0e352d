"""`python -m fourbit` (and `torchrun -m fourbit`) is the `fourbit` command."""

import sys

from fourbit.cli import main

sys.exit(main())
