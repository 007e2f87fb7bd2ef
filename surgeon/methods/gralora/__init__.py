"""GraLoRA: granular LoRA, a k x k grid of low-rank sub-blocks (plus an optional plain LoRA part)."""
