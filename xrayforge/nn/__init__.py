"""Equalized-lr layers, the PGGAN generator and discriminator, its latent convention, and
checkpoint I/O."""
from .checkpoint import find_checkpoint, load_networks, save_networks
from .gan_zoo import load_pytorch_gan_zoo
from .latents import latent_for, latents_for
from .layers import EqualizedConv2d, EqualizedLinear, downsample_conv_kernel, upsample_conv_kernel
from .networks import Discriminator, Generator, NetworkConfig, largest_group_size

__all__ = ["EqualizedConv2d", "EqualizedLinear", "Generator", "Discriminator", "NetworkConfig",
           "find_checkpoint", "load_networks", "save_networks", "load_pytorch_gan_zoo", "upsample_conv_kernel",
           "downsample_conv_kernel", "largest_group_size", "latent_for", "latents_for"]
