"""Serving policies: the OpenAI-compatible server, experiments on live traffic (arms, assignment,
logging), feedback from real use, A/B analysis and the safety monitor."""
