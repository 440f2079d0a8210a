import sys

from ddps.cli import main

sys.exit(main())
