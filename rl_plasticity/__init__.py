"""rl_plasticity: loss of plasticity in deep RL — agents, regularizers, diagnostics."""

__version__ = "0.1.0"
