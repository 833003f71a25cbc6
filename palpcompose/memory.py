"""GPU memory of a training run: an estimate printed before training starts, and the message for running out.

The estimate adds what parameter counts and dtypes determine exactly (frozen weights, the LoRA and placeholder rows
with their gradients and AdamW moments) to an activation term scaled from one measurement: SD-1.5 shapes, bf16,
512 px, batch 1, PALP guidance, peak 4.23 GiB allocated on an H100 (docs/data/gpu-2026-11-23/train_b1_min.log), of
which 2.74 GiB were weights and optimizer state, so ~1.5 GiB of activations and workspaces. Activations are taken to
grow with batch x (resolution / 512)^2 x the UNet's top-level width / 320, twice that in fp32, and to drop to
~40% with gradient checkpointing (an assumption, not yet measured on a GPU). It is an estimate, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from palpcompose.errors import PalpcomposeError
from palpcompose.quantize import stored_bytes

GIB = 2**30
ACTIVATION_GIB_512_SD15 = 1.5  # measured (see above): bf16, batch 1, PALP, SD-1.5 top-level width 320
SD15_TOP_WIDTH = 320
CHECKPOINTING_FACTOR = 0.4  # assumed share of activations kept with gradient checkpointing
ADAMW_BYTES_PER_TRAINED_VALUE = 4 * 4  # fp32 weight, gradient, two moments


class OutOfMemory(PalpcomposeError):
    """The GPU ran out of memory while training; the message says what to change. Exit code 1."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float  # frozen UNet, VAE and text encoder in their training dtypes
    trainable_gib: float  # LoRA weights and placeholder rows with gradients and AdamW moments (fp32)
    activations_gib: float  # scaled from the measurement in the module docstring
    total_gib: float

    def describe(self) -> str:
        return (f"estimated peak GPU memory ~{self.total_gib:.1f} GiB (weights {self.weights_gib:.2f}, trained "
                f"values with AdamW state {self.trainable_gib:.2f}, activations ~{self.activations_gib:.2f}); an "
                "estimate from parameter counts and one measured run, not a guarantee")


def _frozen_bytes(module) -> int:
    return sum(stored_bytes(p) for p in module.parameters() if not p.requires_grad)  # 8-bit weights: 1 byte a value


def estimate_training_memory(unet, vae, text_encoder, trained_params, *, resolution: int, batch_size: int,
                             half_precision: bool, gradient_checkpointing: bool,
                             vae_on_device: bool = True) -> MemoryEstimate | None:
    """Peak GPU memory of `training_step` for these (already prepared) modules and settings, in GiB.
    `vae_on_device` False: train.low_memory, the VAE waits in host memory during the steps.
    None for a denoiser that is not a UNet (Flux.1, SD 3 transformers): the activation term scales one SD 1.5
    measurement by the UNet's width and has nothing to say about a transformer (docs/flow-memory.md estimates those
    offline)."""
    if "block_out_channels" not in unet.config:
        return None
    weights = _frozen_bytes(unet) + (_frozen_bytes(vae) if vae_on_device else 0) + _frozen_bytes(text_encoder)
    trainable = sum(p.numel() for p in trained_params) * ADAMW_BYTES_PER_TRAINED_VALUE
    top_width = unet.config.block_out_channels[0]
    activations = (ACTIVATION_GIB_512_SD15 * batch_size * (resolution / 512) ** 2 * top_width / SD15_TOP_WIDTH
                   * (1 if half_precision else 2) * (CHECKPOINTING_FACTOR if gradient_checkpointing else 1))
    return MemoryEstimate(weights / GIB, trainable / GIB, activations, weights / GIB + trainable / GIB + activations)


def out_of_memory_message(config, mixed_precision: str, device_name: str, step: int, checkpoint_step: int | None,
                          checkpoint_dir, estimate: MemoryEstimate | None) -> str:
    """What ran out, what to change (the keys a user sets), and what was kept."""
    train = config.train
    changes = [f"lower train.resolution (now {train.resolution}) or train.batch_size (now {train.batch_size})"]
    if not train.low_memory:
        changes.append("set train.low_memory = true (the low-memory preset: gradient checkpointing, VAE off the GPU; "
                       "slower steps, same results)")
    if train.frozen_weights == "mixed_precision":
        changes.append('set train.frozen_weights = "int8" (the frozen linear weights in 8 bits: about half their '
                       "memory, slightly different results; pip install 'palpcompose[quant]'; a fresh run)")
    if mixed_precision == "no":
        changes.append('set train.mixed_precision = "bf16" (or "fp16" on GPUs without bf16)')
    estimated = f"; {estimate.describe()}" if estimate else ""
    if checkpoint_step is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = (f"the checkpoint of step {checkpoint_step} in {checkpoint_dir} is kept: with only "
                "train.low_memory (or train.gradient_checkpointing) changed, `palpcompose train --resume` continues "
                "from it")
    return (f"CUDA ran out of memory on {device_name} at step {step + 1}{estimated}. To fit: " + "; ".join(changes)
            + f". {kept}")
