import sys

from deetune.replay.cli import main

sys.exit(main())
