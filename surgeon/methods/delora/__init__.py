"""DeLoRA: `config.py` (torch-free) and `layer.py` (runtime: norm-bounded low-rank delta)."""
