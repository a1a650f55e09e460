"""rlhfkit.recipes"""
