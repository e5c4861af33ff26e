import sys

from deetune.agent import main

sys.exit(main())
