"""xrayforge: progressive GANs for chest radiographs, latent class optimisation and fast FID."""
__version__ = "0.1.0"
