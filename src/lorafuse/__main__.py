import sys

from lorafuse.cli import main

sys.exit(main())
