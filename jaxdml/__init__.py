"""jaxdml: deep metric learning and image retrieval in JAX/Flax."""

__version__ = "0.1.0"
