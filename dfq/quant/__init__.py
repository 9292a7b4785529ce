"""Quantization: integer grids and their parameters, fake-quant modules, activation ranges."""
