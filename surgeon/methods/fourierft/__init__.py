"""FourierFT: a sparse trained spectrum whose inverse 2-D FFT is the weight delta."""
