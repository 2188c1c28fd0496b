"""Sampling from trained generators, latent class optimisation, labelled archives."""
from ..nn.latents import latent_for, latents_for  # re-exported: the convention lives in nn

__all__ = ["latent_for", "latents_for"]
