"""python -m infd.cli: the `infd` command (torchrun -m infd.cli eval-gen ... runs it on every rank)."""
import sys

from infd.cli import main

sys.exit(main())
