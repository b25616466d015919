"""When not to trust a prediction: the numeric core, on arrays only.

- :mod:`medxfer.trust.conformal`: split conformal prediction sets (class-conditional by default).
- :mod:`medxfer.trust.ood`: out-of-distribution scores and flags on pooled features.
- :mod:`medxfer.trust.prior_shift`: EM prior adaptation to a new batch's class mix (Saerens et al. 2002).
- :mod:`medxfer.trust.selective`: risk-coverage curve when the model may abstain.
- :mod:`medxfer.trust.audit`: confident-learning label audit and conflicting duplicate images.
- :mod:`medxfer.trust.run_records`: what a run records of them (model.json's conformal record and class
  prior, metrics.json's test coverage and selective rows).

Every module takes and returns numpy arrays and plain dicts (JSON-ready records), and imports nothing of
medxfer but :mod:`medxfer.errors`, so that training, ``predict``, ``serve`` and the report can all use it.
"""
