"""RandLoRA: shared random bases, full-rank updates from two trained scaling matrices per layer."""
