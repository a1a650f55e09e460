"""rlhfkit.eval"""
