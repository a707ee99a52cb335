"""CPU-scale quality benchmark of the aggregation methods on real Dolly data.

    python -m benchmarks.quality            # the full benchmark (about 30 minutes on 2 cores)
    python -m benchmarks.quality --help     # smaller grids, other seeds, another output folder

See benchmarks/quality/README.md for the design and the last measured results.
"""
