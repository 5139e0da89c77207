"""Search of per-layer ratios (the paper's Algorithm 1): the objective and the evolution."""
