"""Progressive training: losses, the WGAN-GP step, EMA."""
from .losses import discriminator_loss, generator_loss, gradient_penalty
from .step import PGGANStep, StepConfig, ema_update, make_adam

__all__ = ["gradient_penalty", "discriminator_loss", "generator_loss", "PGGANStep", "StepConfig", "ema_update",
           "make_adam"]
