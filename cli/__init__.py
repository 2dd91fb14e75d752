"""The ``quorum`` command: one module per command group, registered on the root group in ``cli.main``."""
