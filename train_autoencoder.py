"""Train a Stable-Diffusion-style VAE: `accelerate launch train_autoencoder.py [--config FILE] [key=value ...]`."""

import sys

from vae_hf.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
