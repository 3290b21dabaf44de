"""`python -m tunesmith`: the `tunesmith` command (what a multi-process launch starts in each process)."""

from tunesmith.cli import main

main()
