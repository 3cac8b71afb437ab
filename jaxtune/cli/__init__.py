"""The `jaxtune` command line: `cli.main` parses and dispatches; one module per command group."""
