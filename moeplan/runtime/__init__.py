"""The runtime: torch only here. Model, gating, dispatch/combine, all-to-all, parallelisation,
training and inference loops, checkpoints, timers."""
