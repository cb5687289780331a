"""Darknet models: cfg parsing (cfg.py), shapes (shapes.py), modules (layers.py, darknet.py),
weights and checkpoints (io.py) and summaries (summary.py)."""
