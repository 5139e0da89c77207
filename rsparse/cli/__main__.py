import sys

from rsparse.cli import main

sys.exit(main())
