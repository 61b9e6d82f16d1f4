"""The moe-prefetch command line (typer). The app lives in cli.main."""
