"""1:N accuracy evaluation: protocol, embedding cache, CMC, FNIR@FPIR, DET, demographic differentials.

The harness runs the production pieces (``workers.detect`` decoding, YuNet detection and largest-face
choice, ``workers.engines`` embedders, ``workers.index.GalleryIndex`` search and
``workers.fusion.fuse``) in process, so what it measures is what a real search does. Import from the
modules; this package re-exports nothing:

* :mod:`evaluation.protocol`: the data (``<identity>/<image>`` folders) and the seeded split
  protocol (gallery, mated and non-mated probes, identity-disjoint ``fit`` / ``test`` parts).
* :mod:`evaluation.cache`: the on-disk embedding cache, keyed by image content, detector
  configuration and engine version; the ``OK`` status.
* :mod:`evaluation.embed`: filling the cache (decode, detect, embed), sharded over processes.
* :mod:`evaluation.metrics`: CMC, FPIR / FNIR, FNIR at FPIR, DET, thresholds (pure functions).
* :mod:`evaluation.runs`: the in-process searches (``Run``), and per-system outcomes of engines
  and fusion methods scored on a split part.
* :mod:`evaluation.calibration`: genuine / impostor scores and fitting fusion on the ``fit`` part.
* :mod:`evaluation.demographics`: per-group differentials with people-clustered bootstrap CIs.
* :mod:`evaluation.plots`: CMC and DET plots (matplotlib).
* :mod:`evaluation.significance`: exact McNemar on paired rank-1 outcomes and the paired,
  people-clustered bootstrap of the differences between two systems.
* :mod:`evaluation.subsets`: every engine alone and fused in engine subsets, tested against the
  best single engine (``quorum eval-subsets``).
* :mod:`evaluation.cost`: embed time per face of each engine.
* :mod:`evaluation.queue_run`: the ``--via-queue`` run through a live stack.
* :mod:`evaluation.ci_split`: the labelled ci split and how a run of it is scored (demo, bench, tests).

The report itself (tables, ``report.json``) is assembled by ``cli.evaluate``.
"""
