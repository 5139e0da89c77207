"""The core of R-Sparse: budgets, the layer, configs and recipes, calibration, model loading, data."""
