"""`python -m minisae COMMAND ...`: the commands are declared in minisae/cli.py."""

import sys

from minisae.cli import entry, main  # noqa: F401  (main: the tests call it)

if __name__ == "__main__":
    sys.exit(entry())
