"""Agents: SAC (off-policy, high replay ratio; fused.py its hand-written update) and PPO (on-policy),
their networks, and seed groups (seeds.py); each registers its networks with the plasticity mixin."""
