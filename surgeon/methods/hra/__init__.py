"""HRA: Householder reflection adaptation, r reflections of a layer's input space."""
