"""Reports: one module per way of reading results (the sweep table, the sensitivity curves)."""
