"""latentcast: task-aware compressed-latent streaming from edge to cloud.

The code lives in the design card's top-level folders, installed as subpackages:
``latentcast.proto`` (wire formats, entropy coding; numpy only), ``latentcast.models``
(PyTorch modules), ``latentcast.edge`` (no torch), ``latentcast.cloud`` and
``latentcast.tools`` (the ``latentcast`` command).
"""

__version__ = "0.1.0"
