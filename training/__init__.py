"""MedSAM Agent training: trajectory synthesis, supervised fine-tuning, reinforcement learning.

Imports the engine (``MedSAMAgentLib``); the engine never imports this package.
"""
