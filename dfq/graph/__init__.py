"""Tracing, declarative op tables and the layer/pair analysis of fx graphs."""
