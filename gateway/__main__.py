"""`python -m gateway` is the `cafe-gateway` command."""

import sys

from gateway.cli import main

sys.exit(main())
