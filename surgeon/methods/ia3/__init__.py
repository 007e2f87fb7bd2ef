"""IA3: `config.py` (torch-free). Parsed and converted; not applied yet (no `layer.py`)."""
