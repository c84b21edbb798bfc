"""denoisplit-zoo: denoiSplit for fluorescence microscopy, packaged for the BioImage Model Zoo.

Pipeline (one module per stage, data flows one way):
data -> noise_model -> model -> losses/training -> sampling -> calibration -> evaluation -> export
"""

__version__ = "0.1.0"
