"""rlhfkit.tasks"""
