"""Cuneiform demo: the embedded stack, the recorder and a simulated fleet of trading agents.

The agents' "LLM" is a tabular softmax policy — a stand-in for a real model (see ``policy``).
"""
