"""Framework adapters that wire :mod:`hbn_core` into each framework's layers and autodiff.

Each adapter is a submodule that imports its framework when it is imported, and only then:
``import backends`` imports no machine-learning framework.
"""
