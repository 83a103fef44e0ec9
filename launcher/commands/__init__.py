"""One module per verb of the command line; `launcher/cli.py` parses and dispatches to them."""
