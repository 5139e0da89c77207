"""The paper's motivating measurements (sections 3.2-3.3) on a model; `rsparse analyze` runs them.

Four analyses, all from one pass of calibration text through the dense model
(rsparse.core.calibrate.collect_activations: sampled input rows of every decoder projection):

1. Contribution heatmaps (Figures 1 and 3). For a layer y = x W^T with the thin SVD
   W = U diag(s) V^T, channel j reaches output direction U[:, i] with weight x_j s_i V[j, i]:
   y = sum_i sum_j (x_j s_i V[j, i]) U[:, i]. The heatmap is C[i, j] = mean over tokens of
   |x_j s_i V[j, i]| = s_i |V[j, i]| mean_t |x_tj| (exact: the token average factorises). Rows
   (components) and columns (input channels) are each sorted ascending by their total, so the
   largest contributions sit bottom-right, as in the paper. Mass fractions per layer: the share of
   sum(C) in the top-50% channels x top-50% components block, against keeping only channels
   (sparse-only) or only components (low-rank-only).
2. Stable rank of the bias matrix (section 3.3). Per token, the two-phase activation replaces the
   dropped channels (|h_k| <= T0) by sign(h_k) c, c = (T0 + T1) / 2; their contribution to the
   output is two bias vectors B+ = c W[:, D+] 1 and B- = -c W[:, D-] 1 (D+/D-: dropped channels
   with positive/negative value). The bias matrix M stacks [B+, B-] of N tokens as 2N columns.
   Reported: stable rank ||M||_F^2 / ||M||_2^2 and the numerical ranks at 90% / 99% energy, next
   to the same numbers for the exact residual R = W (h * drop) and for W itself.
3. Multi-phase ReLU (Figure 2): perplexity when the input of every down_proj (site
   `down_input`) or the output of every MLP activation function (site `act`, the paper's
   literal setting) goes through a 1-phase (dropped values -> 0) or 2-phase (dropped values ->
   the midpoint of [T1, T0]; or, as a diagnostic, their calibration mean) function, at several
   sparsities. See `multiphase` and `phase_levels`.
4. Kept-channel distributions: the model sparsified with rsparse.sparsify_ (tokens="all"), the
   per-token fraction of kept input channels of every layer on held-out text.

Outputs (in --out): contributions.png, contribution_mass.png, bias_rank.png,
multiphase_relu.png, kept_channels.png and analysis.json with every number. docs/analysis.md
describes the definitions and the results on the embedded SmolLM2-135M.
"""

# The names `rsparse analyze` takes; here, torch-free, so that its --help loads nothing heavy.
PARTS = ("heatmap", "bias", "phase", "kept")
PHASE_SITES = ("down_input", "act")  # where the multi-phase function acts (multiphase.py)
PHASE_VARIANTS = {  # name: (phases, description)
    "1": (1, "1 phase: dropped values -> 0"),
    "2": (2, "2 phases: dropped values -> midpoint (T0 + T1) / 2 (the paper's tau)"),
    "2mean": (2, "2 phases, bin mean: dropped values -> their calibration mean"),
}
