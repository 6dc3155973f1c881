"""The DVC stages, one module each (``tune`` is a package: its search space, trial and results
are separate concerns). A stage reads its section of params.yaml and its ``deps``
(:mod:`pipelines.paths`), writes its ``outs``, and logs one MLflow run; it never imports
another stage: what two stages share lives in a module named for it (:mod:`pipelines.data`,
:mod:`pipelines.contracts`, :mod:`pipelines.metrics`, :mod:`pipelines.train`)."""
