"""``python -m groupmamba.eval``: evaluate a checkpoint (forwards to ``groupmamba.train.evaluate``)."""
import sys

from groupmamba.train.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
