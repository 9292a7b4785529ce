"""Float-preserving (or deliberately approximating) graph transforms of the DFQ pipeline.

Each takes `(gm, stats)` and returns a `dfq.records.Transformed(gm, stats, info)`: a new
GraphModule, the updated statistics, and per-layer records for the report
(dfq.records.LayerRecord). Nothing changes in place.
"""
