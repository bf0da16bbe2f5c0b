"""`python -m ttd ...` runs the `ttd` command (for environments where the script is not on PATH)."""

from ttd.cli import main

if __name__ == "__main__":  # guarded: decoding worker processes (spawn) import this module again
    main(prog_name="ttd")
