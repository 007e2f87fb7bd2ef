"""OSF: orthogonal subspace fine-tuning, training a layer's low singular directions only."""
