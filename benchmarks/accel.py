"""Speed levers for the training step, each behind its own switch, all off by default (research code: the product
never turns them on; benchmarks/ours.py applies them around palpcompose.step.training_step).

At 512 px and batch 1 an SD-1.5 step is launch-bound: the GPU is busy for a fraction of the wall time while Python
issues a few thousand small kernels. The levers here remove launches (CUDA graphs, fused AdamW, compiled
transformer blocks) or pick faster kernels (channels-last convolutions, an SDPA backend). None of them changes the
math: tests/test_benchmarks_accel.py checks losses and gradients against the plain eager step. The CUDA graphs
reach the step through `GraphedTrainingUNet`, installed as the state's `unet`. See
docs/performance.md for what each one measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@dataclass(frozen=True)
class AccelOptions:
    cuda_graphs: bool = False  # replay the fixed-shape no-grad UNet passes of the guidance from CUDA graphs
    graph_personalization: bool = False  # replay the personalization pass (forward + backward) from CUDA graphs
    fused_adamw: bool = False  # one fused kernel for the whole AdamW update instead of a few per tensor list
    channels_last: bool = False  # NHWC convolutions (cuDNN's fast path for half precision)
    sdpa_backend: str = "auto"  # auto | flash | efficient | cudnn | math: restrict scaled_dot_product_attention
    compile_blocks: bool = False  # torch.compile each repeated transformer block (regional compilation)

    def __post_init__(self):
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, not {self.sdpa_backend!r}")

    def label(self) -> str:
        """A short name for logs and benchmark tables, e.g. "graphs+fused"."""
        on = [name for name, flag in (("graphs", self.cuda_graphs), ("graphs_pers", self.graph_personalization),
                                      ("fused", self.fused_adamw),
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
        # One training step calls the block in up to 3 widths x (grad, no-grad) x (adapter on, off) x 2 batch
        # sizes: raise dynamo's recompile limit (8 by default) so none of them silently falls back to eager.
        import torch._dynamo as dynamo

        config = dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in 2.6
        setattr(config, limit, max(getattr(config, limit), 64))
        unet.compile_repeated_blocks()
    return unet


def rebuild_adamw(optimizer: torch.optim.AdamW, fused: bool) -> torch.optim.AdamW:
    """A fresh AdamW over the same parameter groups and hyperparameters, fused or not (fused: CUDA, and the CPU
    since torch 2.4). Call it before the first step: optimizer state is not carried over."""
    if optimizer.state:
        raise ValueError("rebuild_adamw: the optimizer has already stepped; rebuild it before training starts")
    groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=fused)


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



class GraphCache:
    """CUDA graphs of no-grad calls, one per (key, input shapes and dtypes), each captured at its first use.

    `cache(fn, key, *inputs)` replays the graph captured for `key` and these shapes, capturing `fn` first if needed.
    `key` must name everything about `fn` that the inputs do not (e.g. whether the LoRA adapter is on): two calls
    with the same key and shapes replay the same kernels. See GraphedNoGrad for what `fn` may do.
    """

    def __init__(self):
        self.graphs: dict[tuple, GraphedNoGrad] = {}

    def __call__(self, fn: Callable[..., torch.Tensor], key, *inputs: torch.Tensor) -> torch.Tensor:
        signature = (key, tuple((tuple(x.shape), x.dtype) for x in inputs))
        if signature not in self.graphs:
            self.graphs[signature] = GraphedNoGrad(fn, inputs)
        return self.graphs[signature](*inputs)


class GraphedInference:
    """Rendering: replay the UNet's no-grad forward from CUDA graphs, one per input signature (batch, size).

    Installs itself as `unet.forward` (an instance attribute, so the pipeline's `self.unet(...)` calls reach it);
    `remove()` restores the eager forward. Calls it cannot replay exactly run eagerly: with gradients enabled,
    off CUDA, or with extra conditioning (ControlNet residuals, timestep_cond, cross_attention_kwargs, ...).
    The weights are read at replay time, so fuse or attach a LoRA BEFORE the first call: a capture bakes in which
    modules run (an adapter attached later would be skipped).
    """

    def __init__(self, unet):
        self.unet = unet
        self.eager = unet.forward
        self.graphs = GraphCache()
        unet.forward = self.forward

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        extra = args or any(value is not None for value in kwargs.values())
        if torch.is_grad_enabled() or extra or not sample.is_cuda:
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timestep = torch.as_tensor(timestep, device=sample.device)

        def run(sample, timestep, encoder_hidden_states):
            return self.eager(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        out = self.graphs(run, "unet", sample, timestep, encoder_hidden_states)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def remove(self) -> None:
        del self.unet.forward


class _UNetSample(torch.nn.Module):
    """`unet(x, t, e).sample` as a module, so make_graphed_callables sees the LoRA weights as its parameters."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timesteps, embeds, pooled=None, time_ids=None):
        if pooled is None:
            return self.unet(latents, timesteps, embeds).sample
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(latents.shape[0], -1)}  # SDXL
        return self.unet(latents, timesteps, embeds, added_cond_kwargs=added).sample


class GraphedPersonalizationPass:
    """The personalization branch's UNet pass (forward AND backward, with gradients for the LoRA weights and the
    text embeddings) replayed from CUDA graphs: torch.cuda.make_graphed_callables, one capture per input signature.

    `unet` must run its own mixed precision (accelerate's prepared model wraps forward in autocast). The capture runs
    with autocast's weight cache off: a cast cached before the capture would be read by every replay, stale once the
    optimizer has moved the fp32 LoRA weights (make_graphed_callables refuses an enabled cache for that reason; an
    inner autocast inherits the setting). The LoRA weights must keep their storage (optimizers update in place) and
    their requires_grad flags at every call, as at capture.
    """

    def __init__(self, unet):
        self.unet = unet
        self.graphed: dict[tuple, torch.nn.Module] = {}

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 *added: torch.Tensor) -> torch.Tensor:
        """`added`: SDXL's pooled embeddings and time ids, or nothing."""
        inputs = (latents, timesteps, embeds, *added)
        signature = tuple((tuple(x.shape), x.dtype, x.requires_grad) for x in inputs)
        if signature not in self.graphed:
            sample_args = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
            with torch.autocast(latents.device.type, enabled=False, cache_enabled=False):
                self.graphed[signature] = torch.cuda.make_graphed_callables(_UNetSample(self.unet), sample_args)
        return self.graphed[signature](*inputs)


class GraphedTrainingUNet(torch.nn.Module):
    """The training step's UNet with its passes replayed from CUDA graphs; the benchmarks install it as the state's
    `unet` (`state.unet = GraphedTrainingUNet(state.unet, state.lora_layers, ...)`), so the step itself has no hook.

    `cuda_graphs`: every no-grad call (the guidance's frozen and personalized passes) from a GraphCache keyed by
    whether the LoRA adapter is on at the call (step.adapters switches it around each pass: a capture bakes that
    switch in). `graph_personalization`: the call with gradients (the personalization pass, forward and backward)
    from GraphedPersonalizationPass. Any other call runs the UNet itself. Takes and returns what the UNet does as
    models.unet_forward calls it: `(latents, timesteps, embeds, added_cond_kwargs=None) -> .sample`.
    """

    def __init__(self, unet, lora_layers: list, cuda_graphs: bool, graph_personalization: bool):
        super().__init__()
        self.unet = unet  # accelerate's prepared model: its forward runs under the run's autocast
        self.lora_layers = lora_layers
        self.graphs = GraphCache() if cuda_graphs else None
        self.graphed_pass = GraphedPersonalizationPass(unet) if graph_personalization else None

    def forward(self, latents, timesteps, embeds, added_cond_kwargs=None):
        added = () if added_cond_kwargs is None else (added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        if torch.is_grad_enabled() and self.graphed_pass is not None:
            return _Output(self.graphed_pass(latents, timesteps, embeds, *added))
        if not torch.is_grad_enabled() and self.graphs is not None:
            adapter = not any(layer.disable_adapters for layer in self.lora_layers)

            def run(latents, timesteps, embeds, pooled=None, time_ids=None):
                return _UNetSample(self.unet)(latents, timesteps, embeds, pooled, time_ids)

            return _Output(self.graphs(run, adapter, latents, timesteps, embeds, *added))
        return self.unet(latents, timesteps, embeds, added_cond_kwargs=added_cond_kwargs)


class _Output:
    """What a UNet call returns, as far as models.unet_forward reads it."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample

