"""Evaluation: perplexity and achieved sparsity, lm-evaluation-harness tasks, XSUM."""
