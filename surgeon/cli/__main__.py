"""`python -m surgeon.cli`."""
import sys

from surgeon.cli.main import main

sys.exit(main())
