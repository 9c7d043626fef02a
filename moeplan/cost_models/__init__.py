"""Analytic cost models, pure functions with no torch: parameters, FLOPs and roofline compute,
alpha-beta collectives per link tier, memory per GPU, and per-layer / per-step costs."""
