import sys

from deetune.recording.cli import main

sys.exit(main())
