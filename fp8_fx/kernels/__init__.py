"""Hand-written kernels behind fp8_fx ops (Triton)."""
