"""Quorum: multi-engine face search for a consortium of agencies, with accountability built in.

The one name Quorum installs. Its packages keep their folders at the top of the source tree (see the
README's Architecture section) and are installed beneath this one through setuptools' ``package-dir``
(pyproject.toml), so that installing Quorum never puts a generic name (``core``, ``cli``, ``workers``...)
into site-packages:

- ``quorum.schemas`` (``schemas/``): the contract, the messages and results agencies exchange with us;
- ``quorum.core`` (``core/``): settings, errors with stable codes, logging, metrics, the object store;
- ``quorum.broker`` (``broker/``): how messages travel (Celery app, queues, Redis keys, signing);
- ``quorum.accountability`` (``accountability/``): who may search, and the record of it;
- ``quorum.workers`` (``workers/``): the stages a probe passes through, and the engines;
- ``quorum.gallery`` (``gallery/``): the operator's gallery work: enrol, expunge, reindex;
- ``quorum.evaluation`` (``evaluation/``): the accuracy harness;
- ``quorum.review`` (``review/``): the candidate sheet and the reviewers' web app;
- ``quorum.cli`` (``cli/``): the ``quorum`` command.
"""

__version__ = "0.1.0"
