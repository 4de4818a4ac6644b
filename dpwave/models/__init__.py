"""Models: spectral tokenizer, AR transformer, wavelet refiner."""
