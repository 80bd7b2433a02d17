"""Backend-neutral federated rounds for Hybrid Batch Normalisation, over NumPy state.

Importing this package imports no machine-learning framework.
"""
