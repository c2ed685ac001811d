"""fastres: train CIFAR-10 ResNets as fast as the hardware allows, and prove it."""

__version__ = "0.1.0"
