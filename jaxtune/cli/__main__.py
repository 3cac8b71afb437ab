"""`python -m jaxtune.cli`: the same as the `jaxtune` command."""

import sys

from jaxtune.cli.main import main

sys.exit(main())
