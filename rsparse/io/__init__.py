"""On disk: checkpoints (safetensors + JSON), results files, tables and plots."""
