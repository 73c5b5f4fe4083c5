"""``python -m groupmamba.train`` (same as the ``groupmamba-train`` console script)."""
import sys

from .cli import main

sys.exit(main())
