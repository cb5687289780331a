"""Quantized models: fake quantizers and their range observers, the quantized modules (a conv with its
batch norm folded, activation quantizers shared where adds and concats need one scale) and the
conversion of a float ``Darknet`` into one. A quantized checkpoint is a ``Darknet`` with these modules,
so :mod:`models.io` rebuilds it; quantization-aware training, calibration and the integer exports are
the techniques in :mod:`quant`."""
