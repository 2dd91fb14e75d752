"""``python -m quorum.cli``: the ``quorum`` command without its console script."""

from .main import main

main()
