"""On disk: sparsified models (one format, a transformers directory: checkpoint.py; the quant method
registered with transformers: transformers_format.py; the older format's converter: convert.py),
results files, tables and plots."""
