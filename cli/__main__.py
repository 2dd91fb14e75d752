"""``python -m cli``: the ``quorum`` command without its console script."""

from cli.main import main

main()
