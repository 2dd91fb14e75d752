"""The shared core of Quorum: settings, errors with stable codes, logging, metrics, the object store.

Every other package may import it; it imports none of them (except the contract in ``schemas``).
The packages, in the order their imports run: ``schemas`` (the contract) <- ``core`` <- ``broker``
(how messages travel) <- ``accountability`` (who may search, and the record of it) <- ``workers``
(the stages a probe passes through) <- ``evaluation`` (the accuracy harness) <- ``cli`` (the
``quorum`` command).
"""

__version__ = "0.1.0"
