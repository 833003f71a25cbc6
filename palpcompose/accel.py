"""Speed levers for the training step, each behind its own switch, all off by default.

At 512 px and batch 1 an SD-1.5 step is launch-bound: the GPU is busy for a fraction of the wall time while Python
issues a few thousand small kernels. The levers here remove launches (CUDA graphs, fused AdamW, compiled
transformer blocks) or pick faster kernels (channels-last convolutions, an SDPA backend). None of them changes the
math: tests/test_step_equivalence.py checks losses and gradients against the plain eager step. See
docs/performance.md for what each one measured.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@dataclass(frozen=True)
class AccelOptions:
    cuda_graphs: bool = False  # replay the fixed-shape no-grad UNet passes of the guidance from CUDA graphs
    fused_adamw: bool = False  # one fused kernel for the whole AdamW update instead of a few per tensor list
    channels_last: bool = False  # NHWC convolutions (cuDNN's fast path for half precision)
    sdpa_backend: str = "auto"  # auto | flash | efficient | cudnn | math: restrict scaled_dot_product_attention
    compile_blocks: bool = False  # torch.compile each repeated transformer block (regional compilation)

    def __post_init__(self):
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, not {self.sdpa_backend!r}")

    def label(self) -> str:
        """A short name for logs and benchmark tables, e.g. "graphs+fused"."""
        on = [name for name, flag in (("graphs", self.cuda_graphs), ("fused", self.fused_adamw),
                                      ("channels_last", self.channels_last), ("compile", self.compile_blocks)) if flag]
        if self.sdpa_backend != "auto":
            on.append(f"sdpa={self.sdpa_backend}")
        return "+".join(on) or "eager"


def prepare_unet(unet: torch.nn.Module, opts: AccelOptions) -> torch.nn.Module:
    """Apply the module-level levers in place (memory format, regional compilation). Returns the same module."""
    if opts.channels_last:
        unet.to(memory_format=torch.channels_last)
    if opts.compile_blocks:
        # Regional compilation: the UNet repeats one transformer block class 16 times (SD-1.5); compiling that
        # block instead of the whole model compiles a few small graphs (one per shape) in seconds, not minutes.
        unet.compile_repeated_blocks()
    return unet


def to_memory_format(x: torch.Tensor, opts: AccelOptions) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last and x.dim() == 4 else x


def make_adamw(params, opts: AccelOptions, **kwargs) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or param groups), fused when asked (CUDA, and CPU since torch 2.4)."""
    if opts.fused_adamw:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def sdpa_context(opts: AccelOptions):
    """A context manager that restricts PyTorch's scaled_dot_product_attention to the chosen backend."""
    if opts.sdpa_backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
    }[opts.sdpa_backend]
    return sdpa_kernel([backend])


class GraphedNoGrad:
    """A no-grad call with fixed input shapes, captured once as a CUDA graph and replayed.

    `fn(*inputs) -> Tensor` must only read its inputs and module weights whose storage never moves (frozen weights,
    and trainable weights an optimizer updates in place). Whatever Python state `fn` sets while it runs is baked in
    at capture: e.g. a `fn` that turns peft adapters off around the UNet call replays the frozen base model forever,
    whatever the adapters' state is at replay time. Each call copies the inputs into static buffers, replays the
    kernels, and returns a copy of the output (so two calls never alias).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], warmup: int = 2):
        if not torch.cuda.is_available() or not all(x.is_cuda for x in example_inputs):
            raise RuntimeError("CUDA graphs need CUDA tensors")
        self.static_inputs = [x.detach().clone() for x in example_inputs]
        # Warm up on a side stream (cuDNN/cuBLAS pick algorithms and allocate workspaces outside the capture).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.static_inputs, inputs, strict=True):
            if buffer.shape != x.shape:
                raise ValueError(f"graphed call captured for shape {tuple(buffer.shape)}, got {tuple(x.shape)}")
            buffer.copy_(x)
        self.graph.replay()
        return self.static_output.clone()


class GuidancePasses:
    """The no-grad UNet passes of the guidance term (method.md step 5), as few and as cheap as possible.

    `bind(...)` returns the `denoise(x, adapter=..., prompt=..., scale=...)` callable that `guidance.PalpGuidance`
    expects, for one step's timesteps and personalization-prompt embeddings:
    - CFG with scale s != 1 runs the unconditional and conditional predictions as ONE batched pass (2B samples);
      s == 1 runs the conditional pass only (G^1 = G(x, t, y)).
    - `adapter=False` is the frozen model G_base: the same UNet with the peft adapters disabled around the call.
    - with `opts.cuda_graphs`, each distinct pass (adapter on/off, with/without CFG) is captured once as a CUDA
      graph at its first use and replayed afterwards; the adapter toggling is baked into the capture.
    The returned prediction is eps in fp32 (v-prediction models are converted with the scheduler's abar_t).
    """

    def __init__(self, unet, null_embeds: torch.Tensor, clean_embeds: torch.Tensor, opts: AccelOptions,
                 prediction_type: str = "epsilon"):
        self.unet = unet
        self.null_embeds = null_embeds.detach()  # (1, 77, D): the empty prompt, encoded once
        self.clean_embeds = clean_embeds.detach()  # (1, 77, D): the clean target prompt y_c, encoded once
        self.opts = opts
        self.prediction_type = prediction_type
        self.graphs: dict[tuple[bool, bool], GraphedNoGrad] = {}

    def _unet_pass(self, adapter: bool):
        def run(latents, timesteps, embeds):
            if not adapter:
                self.unet.disable_adapters()
            try:
                with sdpa_context(self.opts):
                    return self.unet(to_memory_format(latents, self.opts), timesteps, embeds).sample
            finally:
                if not adapter:
                    self.unet.enable_adapters()

        return run

    def _predict(self, adapter: bool, with_cfg: bool, latents, timesteps, embeds):
        run = self._unet_pass(adapter)
        if not self.opts.cuda_graphs:
            with torch.no_grad():
                return run(latents, timesteps, embeds)
        key = (adapter, with_cfg)
        if key not in self.graphs:
            self.graphs[key] = GraphedNoGrad(run, (latents, timesteps, embeds))
        return self.graphs[key](latents, timesteps, embeds)

    def bind(self, timesteps: torch.Tensor, abar_t: torch.Tensor, personal_embeds: torch.Tensor):
        """`timesteps` (B,), `abar_t` (B, 1, 1, 1), `personal_embeds` (B, 77, D) for this step."""
        personal_embeds = personal_embeds.detach()

        def denoise(latents: torch.Tensor, *, adapter: bool, prompt: str, scale: float) -> torch.Tensor:
            batch = latents.shape[0]
            cond = self.clean_embeds.expand(batch, -1, -1) if prompt == "clean" else personal_embeds
            unet_dtype = self.null_embeds.dtype
            x = latents.to(unet_dtype)
            if scale == 1.0:
                out = self._predict(adapter, False, x, timesteps, cond.to(unet_dtype)).float()
            else:
                # One batched pass for G(x, t, null) and G(x, t, y): (2B, C, H, W), halves the kernel launches.
                embeds = torch.cat([self.null_embeds.expand(batch, -1, -1), cond.to(unet_dtype)])
                both = self._predict(adapter, True, torch.cat([x, x]), torch.cat([timesteps, timesteps]), embeds)
                uncond, cond_pred = both.float().chunk(2)
                out = uncond + scale * (cond_pred - uncond)  # classifier-free guidance G^s
            if self.prediction_type == "v_prediction":
                # eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (CFG is linear, so converting after it is exact)
                out = abar_t.sqrt() * out + (1 - abar_t).sqrt() * latents.float()
            return out

        return denoise
