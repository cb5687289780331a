"""The compression steps as typed stages: each kind (train, prune, ptq, export) has an options
dataclass whose fields are its script's flags, and ``run(options) -> StageResult``. The top-level
scripts parse their command line into these options; the pipeline builds them from a recipe and sets
the fields it manages directly. :data:`stages.registry.KINDS` lists them."""
