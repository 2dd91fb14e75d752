"""The gallery from the operator's side: enrol a folder, a manifest or a booking system's records
(``enrol``, ``items``), expunge a subject (``expunge``), rebuild an engine's templates for a new
version (``reindex``) and look after the versions a gallery holds (``versions``). Only the CLI (and the
evaluation and benchmark harnesses) call it; the workers it drives are in ``workers``. All of it is
audited (``accountability.audit``: ``gallery.enrol``, ``gallery.expunge``, ``gallery.reindex``,
``gallery.drop_version``).
"""
