"""The paper's analyses (Figures 1-3): contributions, bias-matrix rank, multi-phase ReLU, kept channels."""
