"""LoHa (low-rank Hadamard product): `config.py` (torch-free) and `layer.py` (runtime)."""
