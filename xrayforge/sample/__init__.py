"""Sampling from trained generators, latent class optimisation, labelled archives."""
from .sampler import latent_for, latents_for

__all__ = ["latent_for", "latents_for"]
