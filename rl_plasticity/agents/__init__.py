"""Agents: SAC (off-policy, high replay ratio); each registers its networks with the plasticity mixin."""
