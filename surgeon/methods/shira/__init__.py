"""SHiRA: a sparse high-rank adapter, r(in + out) trained entries of the weight at fixed indices."""
