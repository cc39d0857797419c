"""The `polarc` subcommands, one module per group; `polarc/cli.py` wires them. A command only
parses and checks its options, calls the pipeline and prints what came back."""
