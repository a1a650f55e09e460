"""rlhfkit.judges"""
