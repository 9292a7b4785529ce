"""Float-preserving (or deliberately approximating) graph transforms of the DFQ pipeline.

Each takes `(gm, stats)` and returns a `dfq.records.Transformed(gm, stats, info)`: a new
GraphModule, the updated statistics, and per-layer notes for the report. Nothing changes in
place.
"""
