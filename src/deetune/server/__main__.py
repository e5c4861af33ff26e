import sys

from deetune.server.cli import main

sys.exit(main())
