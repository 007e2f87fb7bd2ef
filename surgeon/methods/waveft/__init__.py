"""WaveFT: sparse trained wavelet coefficients, an inverse 2-D wavelet transform to a delta weight."""
