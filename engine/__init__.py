"""The training engine: one loop (:mod:`engine.trainer`) that techniques extend through hooks
(:mod:`engine.hooks`), its own options (:mod:`engine.options`) and process-group handling
(:mod:`engine.distributed`). Nothing here imports a technique package: ``stages/train.py`` assembles
the techniques' hooks and hands them to the trainer."""
