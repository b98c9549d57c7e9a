"""wan: our PyTorch implementation of Wan 2.1 (DiT, 3-D causal VAE, umT5 conditioning, samplers)."""
