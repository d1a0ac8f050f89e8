"""The ``slimkv`` console script: one module per subcommand."""
