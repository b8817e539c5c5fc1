"""Extra CLI commands, one module each; a module exposes ``command`` (a click.Command)."""
