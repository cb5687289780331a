"""Shared helpers: errors, command-line plumbing (datasets, loss and metrics arrive with training)."""
