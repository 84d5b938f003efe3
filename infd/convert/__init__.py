"""Start our models from other projects' checkpoints: Stable Diffusion / LDM autoencoders
(autoencoder.py), Stable Diffusion's UNet and settings (stable_diffusion.py)."""
