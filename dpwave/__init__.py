"""dpwave: differentially private image generation by coarse-to-fine wavelet modeling."""

__version__ = "0.1.0"
