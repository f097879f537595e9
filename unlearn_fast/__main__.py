import sys

from unlearn_fast.cli import main

sys.exit(main())
