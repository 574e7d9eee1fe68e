import sys

from afford.cli import main

sys.exit(main())
