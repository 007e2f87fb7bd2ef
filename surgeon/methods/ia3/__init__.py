"""IA3: `config.py` (torch-free) and `layer.py` (runtime: input or output scaling vectors)."""
