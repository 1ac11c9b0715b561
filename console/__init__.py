"""Everything the operator runs: the CLI commands (and later the Textual console)."""
