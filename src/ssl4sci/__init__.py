"""ssl4sci: self-supervised vision transformers for scientific images."""
__version__ = "0.1.0"
