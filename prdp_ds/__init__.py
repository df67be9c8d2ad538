"""prdp_ds: PRDP reward finetuning of Stable Diffusion's UNet with DeepSpeed ZeRO and Triton kernels.

Data flows one way: prompts -> sampler -> rewards -> loss -> DeepSpeed engine step -> checkpoint.
"""

__version__ = "0.1.0"
