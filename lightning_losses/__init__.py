"""Three recent training objectives as PyTorch Lightning building blocks.

Import the sub-packages you need (``lightning_losses.losses``, ``.nets``, ``.modules``, ...):
this top-level module stays light on purpose, so that importing it never pulls in Lightning,
diffusers, torchvision data sets or matplotlib.
"""

__version__ = "0.1.0"
