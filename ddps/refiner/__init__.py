"""The DDPS refiner: mask codecs, the denoiser network, Algorithm 1's objective and Algorithm 2's sampler."""
