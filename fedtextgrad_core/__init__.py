"""FedTextGrad core: tasks, data, LLM engines, the local TextGrad loop, merging and evaluation.

Nothing in this package imports Flower; the Flower apps in ``server_app`` and
``client_app`` are thin adapters over it.
"""
