"""rlhfkit.losses"""
