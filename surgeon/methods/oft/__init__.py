"""OFT: orthogonal fine-tuning, block-diagonal Cayley rotations of a layer's input."""
