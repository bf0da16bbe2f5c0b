"""`python -m ttd ...` runs the `ttd` command (for environments where the script is not on PATH)."""

from ttd.cli import main

main(prog_name="ttd")
