"""LoRA (with rsLoRA and DoRA): `config.py` (torch-free) and `layer.py` (runtime, `dora.py`)."""
