"""Quorum: multi-engine face search with accountability built in.

The package holds what every stage shares (settings, errors, logging, metrics, the object store)
and the ``quorum`` command line. The stages themselves live in the top-level packages ``schemas``
(the contract), ``broker`` (how messages travel) and ``workers`` (what happens to a probe).
"""

__version__ = "0.1.0"
