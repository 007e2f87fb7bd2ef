"""C3A: a block-circulant delta weight, applied to the input by FFTs (circular correlation)."""
