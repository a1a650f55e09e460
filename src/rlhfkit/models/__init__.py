"""rlhfkit.models"""
