"""Reading and writing sparsified models (checkpoint formats)."""
