"""The moe-prefetch command line (typer). The app lives in moe_prefetch.cli.main."""
