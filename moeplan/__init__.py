"""moeplan: a planner and runtime for DeepSpeed-MoE style Mixture-of-Experts models."""

__version__ = "0.1.0"
