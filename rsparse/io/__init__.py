"""On disk: sparsified models (the transformers format, the legacy checkpoint), results files,
tables and plots."""
