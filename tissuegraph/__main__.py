import sys

from tissuegraph.cli import main

sys.exit(main())
