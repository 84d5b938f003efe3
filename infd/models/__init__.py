from infd.models.autoencoder import AutoencoderConfig, AutoencoderOutput, NeuralFieldAutoencoder

__all__ = ["AutoencoderConfig", "AutoencoderOutput", "NeuralFieldAutoencoder"]
