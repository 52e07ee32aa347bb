"""Agents: SAC (off-policy, high replay ratio; fused.py its hand-written update) and PPO (on-policy),
their networks, the formulas both share with their fast paths (formulas.py), and seed groups
(seeds.py); each registers its networks with the plasticity mixin."""
