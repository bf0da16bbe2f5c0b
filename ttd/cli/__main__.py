"""`python -m ttd.cli ...` runs the `ttd` command."""

from ttd.cli import main

if __name__ == "__main__":
    main()
