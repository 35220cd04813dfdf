import sys

from sae_fast.cli import main

sys.exit(main())
