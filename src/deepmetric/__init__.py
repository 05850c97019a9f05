"""deepmetric: deep metric learning in PyTorch.

Sub-packages: ``losses``, ``miners``, ``data``, ``models``, ``evaluation``, ``training``; the CLI is
``deepmetric`` (see ``deepmetric --help``).
"""

__version__ = "0.1.0"
