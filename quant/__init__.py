"""Quantization (issue #6): DoReFa, Google/Jacob et al., BN-folding QAT, power-of-two scales."""
