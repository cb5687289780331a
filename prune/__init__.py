"""Sparse training and the six pruning methods (issue #4): one engine, one policy per method."""
