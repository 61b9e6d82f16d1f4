"""The moe-prefetch command line (typer): the app in app.py, the options `run` and `serve` share
in options.py, commands in commands.py, predictor_cmds.py and serve_cmd.py, the entry point in
main.py. Wiring only: options in, a library call, a table or JSON out.

Layer: the top; may import every other package of moe_prefetch, and none imports it.
"""
