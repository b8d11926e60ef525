"""A tiny affine-coupling flow packaged as a genserve model plugin (a test fixture)."""
