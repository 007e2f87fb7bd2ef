"""VB-LoRA: low-rank factors composed from one shared vector bank by top-k mixtures of logits."""
