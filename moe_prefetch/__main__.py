"""`python -m moe_prefetch` runs the command line, as the `moe-prefetch` script does."""

from .cli.main import main

if __name__ == "__main__":
    main()
