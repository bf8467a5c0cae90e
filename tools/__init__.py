"""The ``latentcast`` command (``cli.py``) and the tools behind it: training and release, export,
benchmarks (``bench/``), evaluation (``eval/``), the demo."""
