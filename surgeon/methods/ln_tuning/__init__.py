"""LN tuning: each adapter trains its own copy of the targeted (normalisation) modules."""
