import sys

from omniopd.cli import main

sys.exit(main())
