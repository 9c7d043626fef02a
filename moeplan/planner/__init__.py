"""The planner: the search over per-layer degrees, the flow simulator that checks it, the band on a
prediction, and the request-to-plan entry point (`planning.plan`)."""
