import sys

from biometry.cli import main

sys.exit(main())
