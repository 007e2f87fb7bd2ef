"""BOFT: butterfly orthogonal fine-tuning, butterfly-factored Cayley rotations of a layer."""
