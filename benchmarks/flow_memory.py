"""GPU memory of a PALP step on Flux.1-dev and SD 3.5 (medium, large), estimated on the meta device: no GPU, no weights.

    python -m benchmarks.flow_memory --arch flux1-dev
    python -m benchmarks.flow_memory --arch sd35-large --json
    python -m benchmarks.memory_estimate --arch flux1-dev      # the same, through the SD command

What is exact and what is measured (docs/flow-memory.md says what it means for 16-80 GB cards):
- **Weights**: parameter counts of the published configs (benchmarks/archs.py), 2 bytes per frozen value in bf16;
  with `8bit`, 1 byte per weight of every frozen nn.Linear of the transformer and of T5 (fp8 or int8 weight-only:
  torchao / bitsandbytes store a byte per value plus per-row scales, not counted), the rest in bf16. This assumes
  backward keeps no dequantized copy: torchao 0.18's weight-only tensors do keep one unless the linear is wrapped
  (docs/flow-memory.md, "8-bit weights").
  Text encoders on the GPU are bf16 (CLIPs 8-bit too would save < 0.4 GiB); the VAE is off the GPU (latents cached).
- **Trained values**: the LoRA (peft, rank r, the family targets of docs/families.md) and one token row per encoder
  that trains one, fp32, with gradient and two AdamW moments: 16 bytes per value.
- **Activations of the personalization pass** (grad through the LoRA), *measured on meta*: saved-tensor hooks count
  the bytes autograd keeps for backward in one bf16 forward of the whole transformer at the model's sequence length
  (image tokens (R/16)^2 plus 512 T5 tokens for Flux, 77 + 256 for SD 3), each saved storage once, parameters
  excluded, attributed to the block that saved it. Attention is counted as flash/efficient SDPA saves it (q, k, v,
  out, a log-sum-exp per row), not the L x L probabilities meta's math fallback would keep. The engine runs the
  step under bf16 autocast with an fp32 LoRA; meta has no autocast, so `EmulatedAutocast` makes its casts (bf16
  matmul inputs, fp32 norms and softmax) as recorded ops: the fp32 layer-norm inputs and the bf16 copy of each LoRA
  input (peft casts it to fp32, autocast back) are counted. With gradient checkpointing (diffusers' per-block
  checkpointing) only each block's inputs are kept, plus one block's activations while it is recomputed in
  backward: outside + inputs + max(block).
- **Text encoders with trained tokens** (CLIP-L, CLIP-G; T5 with `tokens=clip+t5`): y_P goes through them with
  grad every step; measured the same way (T5's eager attention with its relative bias does keep its probabilities,
  as transformers' T5 does), checkpointed per layer with the checkpointing lever.
- **The no-grad guidance passes** (frozen model at alpha: one pass for guidance-distilled Flux.1-dev, a batched
  cond + uncond pass of 2 samples for real CFG; the personalized pass at beta = 1 is one sample): they run while the
  personalization graph is alive; their peak of live tensors is measured on meta with a dispatch mode that adds each
  new storage and subtracts it when Python frees it.
Not modelled: the CUDA context (~0.5 GiB outside PyTorch's allocator), cuBLAS/attention workspaces and allocator
fragmentation (docs/flow-memory.md's fit rule keeps a margin for them), the backward's own transient buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import archs
from benchmarks._cli import run_main

GIB = 2**30
RESOLUTIONS = (512, 1024)
RANKS = (16, 32)
TOKEN_MODES = ("clip", "clip+t5")  # where the subject's learned token lives; "clip": T5 reads the class word
ADAMW_BYTES = 16  # fp32 value, gradient, two moments
# docs/families.md: the attention projections of both streams (the suffixes also catch Flux's single blocks' to_q/k/v)
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
CARDS_GIB = {16: 16.0, 24: 24.0, 48: 48.0, 80: 79.6}  # what the GPU reports (an "80 GB" H100: 79.6 GiB)
CUDA_CONTEXT_GIB = 0.5
FIT_MARGIN = 0.10  # an estimate must stay 10% under what is left after the context to count as fitting


# --- counting on the meta device ------------------------------------------------------------------------------


class _FlashLikeAttention(torch.autograd.Function):
    """What flash / memory-efficient SDPA keeps for backward: q, k, v, the output and one fp32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the estimate only goes forward
        raise NotImplementedError


@contextlib.contextmanager
def flash_like_sdpa():
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashLikeAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class EmulatedAutocast(TorchFunctionMode):
    """CUDA bf16 autocast's casts for the ops that matter to memory, on meta (where real autocast does nothing).

    A function mode runs above autograd, as autocast does, so each cast is a recorded op whose result the next op
    saves, exactly as under `accelerator.autocast()`: matmuls get bf16 inputs (an fp32 LoRA weight, a fp32 input),
    layer/group norms and softmax fp32 ones (their outputs are fp32 too)."""

    LOW = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
                     torch.mm, torch.addmm, F.conv2d})
    FP32 = frozenset({F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax})

    def __init__(self):
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}  # autocast caches casts of leaves that require grad (the LoRA)

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype):
            return t
        if t.is_leaf and t.requires_grad:
            key = id(t)
            if key not in self.cache or self.cache[key].dtype != dtype:
                self.cache[key] = t.to(dtype)
            return self.cache[key]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.FP32 else None
        if dtype is not None:
            args, kwargs = pytree.tree_map(lambda t: self._cast(t, dtype), (args, kwargs))
        return func(*args, **kwargs)


def _storage_owner(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class SavedActivations:
    """Bytes autograd keeps for backward in one forward: outside the blocks, per block, and the blocks' inputs."""

    outside: int
    blocks: list[int]  # per block, in call order (a block's input that it saves is in `inputs_saved` instead)
    block_inputs: int  # what per-block checkpointing keeps: each distinct tensor passed to a block
    inputs_saved: int  # the part of block_inputs that autograd saves anyway (layer norms' inputs, ...)

    @property
    def full(self) -> int:
        return self.outside + self.inputs_saved + sum(self.blocks)

    @property
    def checkpointed(self) -> int:
        return self.outside + self.block_inputs + max(self.blocks)


def count_saved(model: torch.nn.Module, blocks: list[torch.nn.Module], forward,
                autocast: bool = True) -> SavedActivations:
    """Run `forward()` under saved-tensor hooks (and the emulated bf16 autocast) and attribute each saved storage to
    the block running."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()  # storages counted as saved
    inputs: set[int] = set()  # storages passed to a block
    keep: list[torch.Tensor] = []  # holds what was seen, so ids stay unique
    per_block = {id(b): 0 for b in blocks}
    totals = {"outside": 0, "inputs": 0, "inputs_saved": 0}
    stack: list[int] = []

    def add(nbytes: int) -> None:
        if stack:
            per_block[stack[-1]] += nbytes
        else:
            totals["outside"] += nbytes

    def pack(t):
        owner = _storage_owner(t)
        if id(owner) not in params and id(owner) not in seen:
            seen.add(id(owner))
            keep.append(owner)
            if id(owner) in inputs:
                totals["inputs_saved"] += _nbytes(owner)
            else:
                add(_nbytes(owner))
        return t

    def enter(module, args, kwargs):
        stack.append(id(module))
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(_storage_owner(t)) not in inputs:
                owner = _storage_owner(t)
                inputs.add(id(owner))
                keep.append(owner)
                totals["inputs"] += _nbytes(owner)

    def leave(module, args, kwargs, output):
        stack.pop()

    handles = []
    for b in blocks:
        handles.append(b.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(b.register_forward_hook(leave, with_kwargs=True))
    try:
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flash_like_sdpa(),
              EmulatedAutocast() if autocast else contextlib.nullcontext()):
            forward()
    finally:
        for h in handles:
            h.remove()
    return SavedActivations(outside=totals["outside"], blocks=[per_block[id(b)] for b in blocks],
                            block_inputs=totals["inputs"], inputs_saved=totals["inputs_saved"])


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors during a forward: each op's new (non-view) outputs are added when made and
    subtracted when Python frees them (weakref finalizers), as the caching allocator sees them."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.live += _nbytes(t)
                    weakref.finalize(t, self._free, _nbytes(t))
            self.peak = max(self.peak, self.live)
        return out


# --- the models, on meta --------------------------------------------------------------------------------------


@dataclass
class MetaFlowModels:
    spec: archs.FlowArchSpec
    transformer: torch.nn.Module
    clips: list  # CLIP-L (, CLIP-G)
    t5: torch.nn.Module
    vae_params: int


def build_meta(spec: archs.FlowArchSpec, rank: int) -> MetaFlowModels:
    """The transformer (bf16) with a peft LoRA of `rank` on the family targets (fp32, as models.add_lora keeps it),
    text encoders (bf16), all frozen but the LoRA; no storage."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cls = {"FluxTransformer2DModel": FluxTransformer2DModel, "SD3Transformer2DModel": SD3Transformer2DModel}
    clip_cls = CLIPTextModelWithProjection if spec.clip_with_projection else CLIPTextModel
    with torch.device("meta"):
        transformer = cls[spec.transformer_class](**spec.transformer)
        clips = [clip_cls(CLIPTextConfig(**spec.clip_l))]
        if spec.clip_g is not None:
            clips.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec.clip_g)))
        t5 = T5EncoderModel(T5Config(**spec.t5))
        vae_params = sum(p.numel() for p in AutoencoderKL(**spec.vae).parameters())
    for m in (transformer, t5, *clips):
        m.requires_grad_(False)
        m.eval()
        m.to(torch.bfloat16)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=FLOW_LORA_TARGETS))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return MetaFlowModels(spec, transformer, clips, t5, vae_params)


def transformer_blocks(transformer) -> list:
    return list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))


def transformer_inputs(spec: archs.FlowArchSpec, resolution: int, batch: int) -> dict:
    """The transformer's forward arguments for `batch` images at `resolution` px, on meta, bf16."""
    meta = {"device": "meta", "dtype": torch.bfloat16}
    side = resolution // spec.vae_scale_factor  # latent side
    if spec.transformer_class == "FluxTransformer2DModel":
        tokens = (side // 2) ** 2  # 2x2 latent patches packed into one token of 64 features
        return {
            "hidden_states": torch.empty(batch, tokens, spec.transformer["in_channels"], **meta),
            "encoder_hidden_states": torch.empty(batch, spec.t5_max_length, spec.t5["d_model"], **meta),
            "pooled_projections": torch.empty(batch, spec.clip_l["hidden_size"], **meta),
            "timestep": torch.empty(batch, **meta),
            "img_ids": torch.empty(tokens, 3, **meta),
            "txt_ids": torch.empty(spec.t5_max_length, 3, **meta),
            "guidance": torch.empty(batch, **meta),
        }
    text_tokens = spec.clip_l["max_position_embeddings"] + spec.t5_max_length
    return {
        "hidden_states": torch.empty(batch, spec.transformer["in_channels"], side, side, **meta),
        "encoder_hidden_states": torch.empty(batch, text_tokens, spec.transformer["joint_attention_dim"], **meta),
        "pooled_projections": torch.empty(batch, spec.transformer["pooled_projection_dim"], **meta),
        "timestep": torch.empty(batch, **meta),
    }


def image_tokens(spec: archs.FlowArchSpec, resolution: int) -> int:
    return (resolution // 16) ** 2


def encoder_saved(encoder, layers: list, length: int) -> SavedActivations:
    """One y_P encoding with grad to the learned token (the embedding output requires grad), batch 1."""
    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    table = encoder.get_input_embeddings().weight
    table.requires_grad_(True)  # stands for the learned row: everything after the lookup needs grad
    try:
        return count_saved(encoder, layers, lambda: encoder(input_ids=ids))
    finally:
        table.requires_grad_(False)


def encoder_layers(encoder) -> list:
    stack = encoder.text_model.encoder if hasattr(encoder, "text_model") else encoder.encoder
    return list(stack.layers if hasattr(stack, "layers") else stack.block)  # CLIP | T5


# --- the estimate ---------------------------------------------------------------------------------------------


def _linear_weight_values(module) -> int:
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)


def _frozen_values(module) -> int:
    return sum(p.numel() for p in module.parameters() if not p.requires_grad)


def frozen_bytes(module, eight_bit: bool) -> int:
    """bf16 frozen weights; with `eight_bit`, 1 byte per frozen nn.Linear weight value (fp8 / int8 weight-only)."""
    total = 2 * _frozen_values(module)
    return total - _linear_weight_values(module) if eight_bit else total


@dataclass
class Measured:
    """What one (arch, resolution) needs from meta runs; the rows are arithmetic on it."""

    transformer: SavedActivations
    frozen_pass_peak: int  # live bytes of the no-grad frozen guidance pass
    clips: list[SavedActivations]
    t5: SavedActivations


def measure_transformer(models: MetaFlowModels, resolution: int) -> tuple[SavedActivations, int]:
    """The personalization pass's saved activations and the frozen guidance pass's live peak at `resolution`."""
    spec = models.spec
    t = models.transformer
    saved = count_saved(t, transformer_blocks(t), lambda: t(**transformer_inputs(spec, resolution, 1)))
    frozen_batch = 2 if spec.guidance == "cfg" else 1
    live = LiveBytes()
    with torch.no_grad(), flash_like_sdpa(), EmulatedAutocast(), live:
        t(**transformer_inputs(spec, resolution, frozen_batch))
    return saved, live.peak


def measure_encoders(models: MetaFlowModels) -> tuple[list[SavedActivations], SavedActivations]:
    """y_P through each CLIP (77 tokens) and T5 (the pipeline's max_sequence_length) with grad: resolution-free."""
    clips = [encoder_saved(c, encoder_layers(c), c.config.max_position_embeddings) for c in models.clips]
    return clips, encoder_saved(models.t5, encoder_layers(models.t5), models.spec.t5_max_length)


def measure(models: MetaFlowModels, resolution: int, encoders=None) -> Measured:
    saved, peak = measure_transformer(models, resolution)
    clips, t5 = encoders or measure_encoders(models)
    return Measured(saved, peak, clips, t5)


def lora_values(models: MetaFlowModels) -> int:
    return sum(p.numel() for p in models.transformer.parameters() if p.requires_grad)


def estimate_row(models: MetaFlowModels, measured: Measured, *, resolution: int, rank: int, lora: int,
                 eight_bit: bool, checkpointing: bool, tokens: str, offload: bool) -> dict:
    """One configuration's estimated peak, in GiB, with its terms. `offload`: encoders that train no token leave
    the GPU once the fixed prompts are encoded (and the VAE once the latents are cached); else all stay."""
    spec = models.spec
    t5_trains = tokens == "clip+t5"
    weights = frozen_bytes(models.transformer, eight_bit)
    encoders = sum(frozen_bytes(c, False) for c in models.clips)  # CLIPs train a token in both modes
    if t5_trains or not offload:
        encoders += frozen_bytes(models.t5, eight_bit)
    vae = 0 if offload else 2 * models.vae_params
    token_values = sum(c.config.hidden_size for c in models.clips) + (spec.t5["d_model"] if t5_trains else 0)
    trained = (lora + token_values) * ADAMW_BYTES

    def pick(s: SavedActivations) -> int:
        return s.checkpointed if checkpointing else s.full

    personalization = pick(measured.transformer)
    text = sum(pick(c) for c in measured.clips) + (pick(measured.t5) if t5_trains else 0)
    activations = personalization + text + measured.frozen_pass_peak
    if checkpointing:  # the guidance passes run before backward, the block recompute during it: one or the other
        activations -= min(max(measured.transformer.blocks), measured.frozen_pass_peak)
    total = weights + encoders + vae + trained + activations
    row = {
        "resolution": resolution, "rank": rank, "weights": "8bit" if eight_bit else "bf16",
        "checkpointing": checkpointing, "tokens": tokens, "offload_encoders": offload,
        "transformer_gib": weights / GIB, "encoders_vae_gib": (encoders + vae) / GIB, "trained_gib": trained / GIB,
        "activations_gib": activations / GIB, "personalization_gib": personalization / GIB,
        "text_grad_gib": text / GIB, "guidance_pass_gib": measured.frozen_pass_peak / GIB, "total_gib": total / GIB,
    }
    row["fits_gb"] = [card for card, gib in CARDS_GIB.items() if fits(row["total_gib"], gib)]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def fits(total_gib: float, card_gib: float) -> bool:
    return total_gib <= (1 - FIT_MARGIN) * (card_gib - CUDA_CONTEXT_GIB)


def run_arch(name: str, resolutions=RESOLUTIONS, ranks=RANKS) -> dict:
    """Every lever combination at each resolution and rank. Built once at the largest rank: LoRA values are linear
    in the rank (A is r x in, B is out x r), and the rank's share of the activations (the r-wide LoRA
    intermediates) is under 0.1%, so smaller ranks reuse the measurement."""
    spec = archs.flow_arch_spec(name)
    top = max(ranks)
    models = build_meta(spec, top)
    lora_top = lora_values(models)
    lora = {rank: lora_top * rank // top for rank in ranks}
    encoders = measure_encoders(models)
    report = {
        "arch": name, "guidance": spec.guidance, "t5_max_length": spec.t5_max_length,
        "params": {"transformer": _frozen_values(models.transformer),
                   "clips": [_frozen_values(c) for c in models.clips], "t5": _frozen_values(models.t5),
                   "vae": models.vae_params},
        "lora_values": lora, "measured": {}, "rows": [],
    }
    for resolution in resolutions:
        measured = measure(models, resolution, encoders)
        report["measured"][resolution] = {
            "image_tokens": image_tokens(spec, resolution), "blocks": len(measured.transformer.blocks),
            "transformer_full_gib": measured.transformer.full / GIB,
            "transformer_checkpointed_gib": measured.transformer.checkpointed / GIB,
            "largest_block_gib": max(measured.transformer.blocks) / GIB,
            "frozen_pass_peak_gib": measured.frozen_pass_peak / GIB,
            "t5_full_gib": measured.t5.full / GIB, "t5_checkpointed_gib": measured.t5.checkpointed / GIB,
            "clips_full_gib": [c.full / GIB for c in measured.clips],
        }
        for rank, eight_bit, checkpointing, tokens, offload in itertools.product(
                sorted(ranks), (False, True), (False, True), TOKEN_MODES, (False, True)):
            report["rows"].append(estimate_row(models, measured, resolution=resolution, rank=rank, lora=lora[rank],
                                               eight_bit=eight_bit, checkpointing=checkpointing, tokens=tokens,
                                               offload=offload))
    return report


def print_table(report: dict) -> None:
    p = report["params"]
    print(f"{report['arch']}: transformer {p['transformer'] / 1e9:.2f} B, CLIP {sum(p['clips']) / 1e9:.2f} B, "
          f"T5 {p['t5'] / 1e9:.2f} B, VAE {p['vae'] / 1e6:.0f} M; guidance {report['guidance']}; batch 1; "
          f"rank-32 LoRA {report['lora_values'][32] / 1e6:.1f} M values")
    print("  px    weights ckpt  tokens   encoders   | transf  enc+vae trained activ (pers/text/guid) | total  fits")
    for row in report["rows"]:
        if row["rank"] != 32 or (not row["offload_encoders"] and (row["weights"], row["checkpointing"]) not in
                                 (("bf16", False), ("8bit", True))):
            continue
        where = "off-GPU" if row["offload_encoders"] else "on GPU"
        cards = ",".join(str(c) for c in row["fits_gb"]) or "-"
        print(f"  {row['resolution']:4d}  {row['weights']:5s}  {'on ' if row['checkpointing'] else 'off'}  "
              f"{row['tokens']:7s}  {where:8s}  | {row['transformer_gib']:6.2f} {row['encoders_vae_gib']:6.2f} "
              f"{row['trained_gib']:6.2f} {row['activations_gib']:6.2f} ({row['personalization_gib']:.2f}/"
              f"{row['text_grad_gib']:.2f}/{row['guidance_pass_gib']:.2f}) | {row['total_gib']:6.2f} {cards} GB",
              flush=True)
    delta = report["lora_values"][32] - report["lora_values"][16]
    print(f"  rank 16 instead of 32: -{delta * ADAMW_BYTES / GIB:.2f} GiB in every row")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flow_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=archs.FLOW_ARCHS + ("all",), default="all")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    names = archs.FLOW_ARCHS if args.arch == "all" else (args.arch,)
    reports = []
    for name in names:
        report = run_arch(name)
        print_table(report)
        reports.append(report)
    return {"archs": reports}


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), ())


if __name__ == "__main__":
    sys.exit(main())
