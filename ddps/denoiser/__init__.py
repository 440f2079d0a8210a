"""The DDPS denoiser network: a time-conditioned UNet (paper §3.2, Table 5)."""
from ddps.denoiser.unet import UNET_SIZES, UNet, count_params, create_unet

__all__ = ["UNET_SIZES", "UNet", "count_params", "create_unet"]
