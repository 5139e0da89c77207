"""The decode runtime: the static-cache engine, the compiler-visible ops and the GPU kernels."""
