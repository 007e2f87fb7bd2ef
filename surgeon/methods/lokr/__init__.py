"""LoKr (low-rank Kronecker product): `config.py` (torch-free) and `layer.py` (runtime)."""
