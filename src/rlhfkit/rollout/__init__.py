"""rlhfkit.rollout"""
