"""The moe-prefetch command line (typer): the app in app.py, commands in commands.py and
predictor_cmds.py, the entry point in main.py. Wiring only: options in, a library call, a table
or JSON out.

Layer: the top; may import every other package of moe_prefetch, and none imports it.
"""
