"""Side-by-side benchmarks of scoreflow against score_sde_pytorch (run by hand)."""
