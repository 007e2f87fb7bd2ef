"""RoAd: `config.py` (torch-free) and `layer.py` (runtime: 2-D rotations of output-channel pairs)."""
