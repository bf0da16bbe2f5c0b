"""`python -m ttd.cli ...` runs the `ttd` command."""

from ttd.cli import main

main()
