"""rlhfkit.feedback"""
