"""``latentcast eval``: rate versus machine-task accuracy against classical codecs (see runner.py)."""
