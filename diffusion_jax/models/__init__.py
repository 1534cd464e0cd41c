"""Denoising networks: the NNX UNet, its layers, and the diffusers checkpoint converter."""
from diffusion_jax.models.layers import LOGICAL_AXIS_NAMES
from diffusion_jax.models.unet import LAYOUTS, UNet, count_params, layout_kwargs, unet_from_config

__all__ = ["LAYOUTS", "LOGICAL_AXIS_NAMES", "UNet", "count_params", "layout_kwargs",
           "unet_from_config"]
