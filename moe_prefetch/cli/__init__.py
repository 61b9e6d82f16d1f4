"""The moe-prefetch command line (typer): the app in app.py, commands in commands.py and
predictor_cmds.py, the entry point in main.py."""
