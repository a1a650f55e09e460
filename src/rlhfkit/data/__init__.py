"""rlhfkit.data"""
