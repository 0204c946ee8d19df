"""moesae: multi-expert sparse autoencoders (Scale SAE) and their baselines, reproducibly."""
from .saes import available_architectures, build_sae, load_sae

__version__ = "0.1.0"
__all__ = ["build_sae", "load_sae", "available_architectures", "__version__"]
