"""palpcompose: prompt-aligned personalization (PALP, Arar et al. 2024) for text-to-image diffusion models."""

__version__ = "0.1.0"
