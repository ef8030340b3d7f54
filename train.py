"""Train a registered method: ``python train.py --method mstpp`` (see ``--help``)."""
import sys

from jaxspec.cli import main

if __name__ == "__main__":
    sys.exit(main())
