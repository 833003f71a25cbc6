"""train.frozen_weights (palpcompose/quantize.py): the denoiser's frozen linear weights stored in 8 bits by torchao,
run through an autograd Function that keeps no dequantized copy for backward; tiny models on the CPU."""

from __future__ import annotations

import collections
import copy
import importlib.util
import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from tiny_flow_pipeline import flow_project
from torch import nn

from palpcompose import quantize
from palpcompose.project.settings import changed_weight_settings
from palpcompose.quantize import FrozenQuantLinear, quantize_frozen

# The tests that quantize need torchao (the `quant` extra, in `dev` too); without it they skip, and the others run
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="needs torchao: pip install 'palpcompose[quant]'")


def quiet():
    return Console(file=io.StringIO(), width=120)


def saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while `fn()` runs; returns (fn's result, the saved tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def layer(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96)).to(dtype).requires_grad_(False)


# --- the autograd Function ----------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wrapper_saves_no_copy_of_the_weight_and_computes_what_torchao_does(mode, dtype):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    wrapped = layer(dtype=dtype)
    assert quantize_frozen(wrapped, mode, dtype) == 1 and type(wrapped[0]) is FrozenQuantLinear
    plain = layer(dtype=dtype)  # torchao alone, as docs/flow-memory.md measured it
    quantize_(plain, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())
    weight = wrapped[0].weight
    assert type(weight).__module__.startswith("torchao.")  # stored in 8 bits
    dequantized = weight.dequantize().to(dtype)

    x = torch.randn(5, 64, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, saved = saved_tensors(lambda: wrapped(x))
    y_plain, saved_plain = saved_tensors(lambda: plain(x))
    full = weight.numel()
    assert any(t.numel() == full for t in saved_plain)  # torchao's own linear keeps a dequantized weight ...
    assert not any(t.numel() >= full for t in saved)  # ... the wrapper keeps nothing of that size
    assert torch.equal(y, y_plain)  # torchao's own kernel in forward
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y, F.linear(x, dequantized, wrapped[0].bias), **tol)

    grad = torch.randn_like(y)
    (grad_input,) = torch.autograd.grad(y, x, grad)
    (grad_plain,) = torch.autograd.grad(y_plain, x, grad)
    assert grad_input.dtype == x.dtype
    torch.testing.assert_close(grad_input, grad @ dequantized, **tol)
    torch.testing.assert_close(grad_input, grad_plain, **tol)
    assert weight.grad is None and wrapped[0].bias.grad is None  # frozen: no gradient of their own


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_under_autocast_the_wrapper_computes_in_the_autocast_dtype_as_nn_linear_does(mode):
    """A layer norm's fp32 output entering a frozen linear under bf16 autocast: nn.Linear computes in bf16 and returns
    bf16; so must the 8-bit layer (torchao's own linear would compute and return fp32: twice the activations)."""
    plain, wrapped = layer(dtype=torch.bfloat16), layer(dtype=torch.bfloat16)
    quantize_frozen(wrapped, mode, torch.bfloat16)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y = plain(x), wrapped(x)
    assert y.dtype == y_plain.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain, rtol=0.1, atol=0.05)  # 8-bit rounding of the weight, in bf16
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    assert grad.dtype == torch.float32  # the gradient reaches the fp32 input in its dtype


@needs_torchao
def test_the_wrapper_needs_no_input_gradient_and_works_without_grad():
    wrapped = layer()
    quantize_frozen(wrapped, "int8", torch.float32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = wrapped(x)
    assert y.shape == (3, 96) and y.grad_fn is None


# --- what gets quantized ------------------------------------------------------------------------------------------


def tiny_unet(tiny_pipeline_dir, *, lora: bool = True):
    from diffusers import UNet2DConditionModel

    from palpcompose import models

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").requires_grad_(False)
    params = []
    if lora:
        torch.manual_seed(0)
        params = models.add_lora(unet, 4, 4.0)
    return unet, params


@needs_torchao
def test_every_frozen_linear_is_quantized_and_the_lora_is_not(tiny_pipeline_dir):
    unet, lora_params = tiny_unet(tiny_pipeline_dir)
    linears = [name for name, m in unet.named_modules() if isinstance(m, nn.Linear)]
    frozen = [name for name in linears if "lora_" not in name]
    base_layers = [name for name in frozen if name.endswith(".base_layer")]
    assert base_layers and len(frozen) > len(base_layers)  # LoRA base layers and other frozen linears (ff, time)
    assert quantize_frozen(unet, "mixed_precision", torch.float32) == 0  # the default changes nothing
    assert all(type(m) is nn.Linear for m in unet.modules() if isinstance(m, nn.Linear))

    assert quantize_frozen(unet, "int8", torch.bfloat16) == len(frozen)
    modules = dict(unet.named_modules())
    for name in frozen:
        assert type(modules[name]) is FrozenQuantLinear, name
        weight = modules[name].weight
        assert type(weight).__name__ == "Int8Tensor" and weight.dtype == torch.bfloat16, name  # computes in bf16
        assert weight.numel() <= quantize.stored_bytes(weight) < 2 * weight.numel(), name  # a byte a value + scales
    for name in set(linears) - set(frozen):  # lora_A / lora_B: full-precision trainable parameters
        assert type(modules[name]) is nn.Linear and type(modules[name].weight) is nn.Parameter, name
        assert modules[name].weight.requires_grad and modules[name].weight.dtype == torch.float32, name  # left fp32
    assert {id(p) for p in lora_params} == {id(p) for p in unet.parameters() if p.requires_grad}
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m.weight) is nn.Parameter and m.weight.dtype == torch.float32 for m in convs)  # as is


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_the_lora_gradient_in_8_bits_is_close_to_full_precision(tiny_pipeline_dir, mode):
    """One UNet forward and backward with the LoRA: its gradient (and the gradient reaching the text embeddings,
    through the frozen cross-attention projections) with 8-bit frozen weights against the same in fp32."""
    reference, params_ref = tiny_unet(tiny_pipeline_dir)
    for p in params_ref:  # lora_B starts at zero: give it values so that lora_A gets a gradient too
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    quantized = copy.deepcopy(reference)
    quantize_frozen(quantized, mode, torch.float32)
    params_q = [p for p in quantized.parameters() if p.requires_grad]

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, reference.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, reference.config.cross_attention_dim, generator=g)
    grads = []
    for unet, params in ((reference, params_ref), (quantized, params_q)):
        embeds = text.clone().requires_grad_(True)
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=embeds).sample
        grads.append(torch.autograd.grad(out.square().mean(), params + [embeds]))
    flat_ref, flat_q = (torch.cat([g.flatten() for g in gs]) for gs in grads)
    assert not torch.equal(flat_ref, flat_q)  # the 8-bit weights were used ...
    error = ((flat_q - flat_ref).norm() / flat_ref.norm()).item()
    assert error < 0.05, error  # ... and give about the same gradient (int8 ~0.5%, fp8 e4m3 ~3% here)
    embed_error = ((grads[1][-1] - grads[0][-1]).norm() / grads[0][-1].norm()).item()
    assert 0 < embed_error < 0.05, embed_error  # the tokens' gradient flows back through the wrapper


@needs_torchao
def test_a_flux_pass_keeps_what_bf16_keeps_and_no_weight_copy(flux_dir):
    """The tiny Flux transformer, LoRA attached, one forward with grad under bf16 autocast: with the wrapper autograd
    keeps exactly the activations the bf16 model keeps (same shapes, dtypes and bytes); torchao's linear alone keeps
    a bf16 copy of every frozen linear weight on top."""
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from palpcompose import models

    def saved_by(variant):
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer").requires_grad_(False)
        model.to(torch.bfloat16)
        models.add_lora(model, 4, 4.0, models.family_of("flux").lora_targets)
        linears = quantize.frozen_linears(model)
        weight_shapes = {tuple(m.weight.shape) for _, m in linears}
        if variant == "torchao":
            chosen = {id(m) for _, m in linears}
            quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: id(module) in chosen)
        elif variant == "int8":
            quantize_frozen(model, "int8", torch.bfloat16)
        params = {id(p) for p in model.parameters()}
        c, g = model.config, torch.Generator().manual_seed(0)
        inputs = {"hidden_states": torch.randn(1, 16, c.in_channels, generator=g),
                  "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim, generator=g),
                  "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
                  "timestep": torch.full((1,), 0.5), "guidance": torch.full((1,), 3.5),
                  "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(**inputs, return_dict=False)[0]

        _, saved = saved_tensors(forward)
        owners = {}
        for t in saved:
            while t._base is not None:
                t = t._base
            if id(t) not in params:
                owners[id(t)] = t
        kept = sorted((tuple(t.shape), str(t.dtype)) for t in owners.values())
        return kept, sum(t.numel() * t.element_size() for t in owners.values()), weight_shapes

    bf16, bf16_bytes, weight_shapes = saved_by("bf16")
    int8, int8_bytes, _ = saved_by("int8")
    alone, alone_bytes, _ = saved_by("torchao")
    assert int8 == bf16 and int8_bytes == bf16_bytes
    extra = collections.Counter(alone) - collections.Counter(bf16)  # torchao alone: its weight copies (and its fp32
    assert alone_bytes > bf16_bytes  # outputs for fp32 inputs, which autocast does not see)
    assert any(dtype == "torch.bfloat16" and (shape in weight_shapes or shape[::-1] in weight_shapes)
               for shape, dtype in extra)


# --- the setting --------------------------------------------------------------------------------------------------


def test_frozen_weights_changes_the_weights_and_reads_as_the_default_in_older_manifests():
    older = {"train": {"steps": 2}, "palp": {"guidance": "palp"}}  # written before the key existed
    default = {"train": {"steps": 2, "frozen_weights": "mixed_precision"}, "palp": {"guidance": "palp"}}
    int8 = {"train": {"steps": 2, "frozen_weights": "int8"}, "palp": {"guidance": "palp"}}
    assert changed_weight_settings(older, default) == []
    assert changed_weight_settings(older, int8) == [("train.frozen_weights", "mixed_precision", "int8")]


@pytest.mark.parametrize("command", ["check", "train"])
def test_8_bits_without_torchao_is_exit_2_naming_the_setting_and_the_pip_extra(make_project, run_cli, monkeypatch,
                                                                                 command):
    root = make_project({"train": {"frozen_weights": "int8"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name, *a: None if name == "torchao"
                        else real(name, *a))
    result = run_cli(command, root)
    assert result.code == 2, result.err
    assert "train.frozen_weights" in result.err and "pip install 'palpcompose[quant]'" in result.err
    assert "Traceback" not in result.err and not (root / "out").exists()
    root_default = make_project({}, dirname="default")  # the default needs no torchao
    assert run_cli("check", root_default).code == 0


# --- training -----------------------------------------------------------------------------------------------------


def flux_project(root, base_model, **train):
    """tiny_flow_pipeline.flow_project without snapshots."""
    return flow_project(root, base_model, **{"save_every": 0, **train})


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tiny_flow_pipeline import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", guidance_embeds=True)


def _losses(root) -> list[float]:
    return [json.loads(line)["loss_pers"] for line in (root / "out" / "logs" / "train.jsonl").read_text().splitlines()]


def _spy_quantized(monkeypatch) -> list[int]:
    """The number of layers each quantize_frozen call of the training setup stored in 8 bits."""
    from palpcompose import step

    counts = []

    def spy(*args):
        counts.append(quantize_frozen(*args))
        return counts[-1]

    monkeypatch.setattr(step, "quantize_frozen", spy)
    return counts


@needs_torchao
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_training_with_int8_frozen_weights_completes_records_the_setting_and_exports_the_lora(
        family, make_project, flux_dir, tmp_path, monkeypatch, run_cli, one_thread):
    from palpcompose.outputs import preview_path
    from palpcompose.train import train
    from palpcompose.weights import load_trained_weights

    def project(name, **train_settings):
        if family == "flux":
            return flux_project(tmp_path / name, flux_dir, **train_settings)
        return make_project({"train": {"save_every": 0, **train_settings}}, dirname=name)

    counts = _spy_quantized(monkeypatch)
    plain = project("plain")
    train(plain, console=quiet())
    int8 = project("int8", frozen_weights="int8", preview_every=2)  # a preview grid drawn on the 8-bit weights too
    assert train(int8, console=quiet()).status == "completed"
    assert counts[0] == 0 and counts[1] > 0  # the default quantized nothing; int8 its frozen linears
    assert preview_path(int8 / "out", 2).is_file()
    manifest = json.loads((int8 / "out" / "manifest.json").read_text())
    assert manifest["config"]["train"]["frozen_weights"] == "int8"
    torch.testing.assert_close(_losses(int8), _losses(plain), rtol=2e-2, atol=1e-3)  # about the same training ...
    assert _losses(int8) != _losses(plain)  # ... on the 8-bit weights

    # The trained files hold the LoRA (fp32) and the tokens, never base weights; export and render as usual
    weights = load_trained_weights(int8 / "out" / "weights" / "final")
    assert weights.lora and all("lora_" in key for key in weights.lora)
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in weights.lora.values())
    assert run_cli("export", int8, "--format", "diffusers", "--out", tmp_path / "export").code == 0
    if family == "sd":
        assert run_cli("render", int8).code == 0


@needs_torchao
def test_an_int8_run_resumes_bit_exactly(make_project, one_thread):
    from palpcompose.train import train
    from palpcompose.weights import load_trained_weights

    straight = make_project({"train": {"steps": 3, "frozen_weights": "int8"}}, dirname="straight")
    train(straight, console=quiet())
    resumed = make_project({"train": {"steps": 3, "frozen_weights": "int8"}}, dirname="resumed")
    train(resumed, steps=2, console=quiet())
    train(resumed, steps=3, resume=True, console=quiet())
    a, b = (load_trained_weights(root / "out" / "weights" / "final") for root in (straight, resumed))
    assert a.lora.keys() == b.lora.keys() and all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    assert all(torch.equal(a.embeddings[k], b.embeddings[k]) for k in a.embeddings)


@needs_torchao
@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_runs_on_the_8_bit_weights_in_that_dtype(flux_dir, tmp_path, mixed_precision,
                                                                         one_thread):
    """What a GPU run does, on the CPU (tiny Flux): frozen weights cast to the mixed-precision dtype, then stored in
    8 bits (computing in that dtype), the step under autocast; the LoRA stays fp32 and gets a gradient."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from conftest import capture_grads, step_runner

    from palpcompose import models
    from palpcompose.flow_step import prepare_flow_state
    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project
    from palpcompose.train import prepare_subjects

    project = load_project(flux_project(tmp_path / "p", flux_dir, frozen_weights="int8"))
    config = project.config
    c = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
    tokens = models.placeholder_tokens(config.project.name, config.subjects)
    AcceleratorState._reset_state()
    try:
        state = prepare_flow_state(config, c, Accelerator(mixed_precision=mixed_precision, cpu=True),
                                   guidance_config(config), tokens)
        dtype = state.weight_dtype
        assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        quantized = [m for m in c.unet.modules() if type(m) is FrozenQuantLinear]
        assert quantized and all(m.weight.dtype == dtype and m.weight.qdata.dtype == torch.int8 for m in quantized)
        assert all(p.dtype == torch.float32 for p in state.lora_params)
        grads = capture_grads(state)
        logged = step_runner(state, prepare_subjects(project, config, state, tokens), batch_size=1)()
        assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
        assert len(grads) == len(state.lora_params) + 1  # lora_A, lora_B per layer, then the token rows
        assert all(g and g[0].abs().sum() > 0 for g in grads[1:-1:2] + grads[-1:])  # every lora_B and the rows
    finally:
        AcceleratorState._reset_state()


@needs_torchao
@pytest.mark.gpu
def test_int8_training_on_cuda_moves_the_8_bit_weights_and_trains_like_bf16(flux_dir, tmp_path, monkeypatch):
    """benchmarks/gpu_suite.sh `quant`: the product's path on a GPU (tiny Flux, bf16): quantized on the CPU, the 8-bit
    weights moved to the device, the step on them; its losses near the bf16 run's."""
    from palpcompose import step
    from palpcompose.train import train

    devices = []
    real = step.quantize_frozen

    def spy(denoiser, *args):
        count = real(denoiser, *args)
        devices.append({p.device.type for p in denoiser.parameters()})  # still on the CPU when quantized
        return count

    monkeypatch.setattr(step, "quantize_frozen", spy)
    plain = flux_project(tmp_path / "plain", flux_dir, steps=3, mixed_precision="bf16")
    int8 = flux_project(tmp_path / "int8", flux_dir, steps=3, mixed_precision="bf16", frozen_weights="int8")
    train(plain, console=quiet())
    assert train(int8, console=quiet()).status == "completed"
    assert devices == [{"cpu"}, {"cpu"}]
    manifest = json.loads((int8 / "out" / "manifest.json").read_text())
    assert manifest["device"].startswith("cuda") and manifest["config"]["train"]["frozen_weights"] == "int8"
    torch.testing.assert_close(_losses(int8), _losses(plain), rtol=5e-2, atol=1e-2)


@needs_torchao
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_two_processes_train_on_int8_frozen_weights(family, make_project, flux_dir, tmp_path):
    """torchrun, 2 CPU processes: DistributedDataParallel skips the 8-bit weights (it cannot broadcast torchao's
    tensors; each process quantizes the same base model to the same values) and averages the LoRA's gradients.
    Flux (T5 tokens, the default): T5's 8-bit weights too, in the text encoder DDP wraps for the token rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if family == "flux":
        root = flux_project(tmp_path / "p", flux_dir, steps=2, frozen_weights="int8")
    else:
        root = make_project({"train": {"steps": 2, "save_every": 0, "frozen_weights": "int8"}})
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}"}
    env.pop("PALP_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "palpcompose.cli", "train", str(root)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["num_processes"] == 2
    assert manifest["config"]["train"]["frozen_weights"] == "int8"


# --- T5, when it trains a token -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tiny_flow_pipeline import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture
def flow_setup(flux_dir, tmp_path, one_thread):
    """prepare_flow_state on the tiny Flux (or the flow pipeline `base`) with the given [train] settings (CPU, fp32
    unless `mixed_precision`): returns (the TrainState, the project, its config, the tokens)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from palpcompose import models
    from palpcompose.flow_step import prepare_flow_state
    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project

    def setup(mixed_precision: str = "no", base=None, **train):
        project = load_project(flux_project(tmp_path / "p", base or flux_dir, **train))
        config = project.config
        c = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
        tokens = models.placeholder_tokens(config.project.name, config.subjects)
        AcceleratorState._reset_state()
        state = prepare_flow_state(config, c, Accelerator(mixed_precision=mixed_precision, cpu=True),
                                   guidance_config(config), tokens)
        return state, project, config, tokens

    yield setup
    AcceleratorState._reset_state()


def _encoder(encoders, kind: str):
    """The encoder of `kind` ("t5", "clip") of a FlowTextEncoders, and its columns in the shared token rows (None: it
    holds no token)."""
    encoder = next(e for e, slot in zip(encoders.encoders, encoders.slots) if slot.kind == kind)
    return encoder, getattr(encoder.get_input_embeddings(), "columns", None)


def _linears(module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


@needs_torchao
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_with_t5_tokens_int8_stores_t5s_frozen_linears_in_8_bits_and_the_token_row_trains(flow_setup, family,
                                                                                          request):
    """train.frozen_weights = "int8", train.t5_tokens = true (the default): after setup every linear of T5 (attention
    q, k, v, o and the gated feed-forward's wi_0, wi_1, wo) is 8-bit behind the wrapper; the CLIP encoders are as
    they were; the token rows stay one fp32 parameter; one step gives the T5 columns a gradient through the 8-bit
    linears and changes them; DDP is told to leave T5's 8-bit weights alone, by their names in the module it wraps."""
    from conftest import capture_grads, step_runner

    from palpcompose.train import prepare_subjects

    base = request.getfixturevalue("sd3_dir") if family == "sd3" else None
    state, project, config, tokens = flow_setup(frozen_weights="int8", base=base)
    encoders = state.components.text_encoder
    t5, t5_columns = _encoder(encoders, "t5")
    clips = [e for e, slot in zip(encoders.encoders, encoders.slots) if slot.kind == "clip"]
    linears = _linears(t5)
    assert {name.rsplit(".", 1)[-1] for name in linears} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    for name, m in linears.items():
        assert type(m) is FrozenQuantLinear and type(m.weight).__name__ == "Int8Tensor", name
        assert m.weight.qdata.dtype == torch.int8 and m.weight.dtype == torch.float32, name  # computes in T5's dtype
        assert m.bias is None, name
    assert clips and all(type(m) is nn.Linear and type(m.weight) is nn.Parameter
                         for clip in clips for m in _linears(clip).values())
    embedding = t5.get_input_embeddings()
    assert type(embedding.table.weight) is nn.Parameter and embedding.table.weight.dtype == torch.float32
    rows = state.token_embedding.rows
    assert rows is embedding.rows and rows.dtype == torch.float32 and rows.requires_grad
    ignored = set(encoders._ddp_params_and_buffers_to_ignore)
    t5_weights = {name for name, p in encoders.state_dict(keep_vars=True).items() if type(p) is not nn.Parameter
                  and type(p).__module__.startswith("torchao.")}
    assert ignored == t5_weights and len(ignored) == len(linears)

    before = rows.detach().clone()
    grads = capture_grads(state)
    step_runner(state, prepare_subjects(project, config, state, tokens), batch_size=1)()
    row_grad = grads[-1][0]
    assert row_grad[:, t5_columns].abs().sum() > 0  # the gradient reached the token through the 8-bit T5
    assert not torch.equal(rows[:, t5_columns], before[:, t5_columns])  # and the T5 row trained
    assert rows.dtype == torch.float32 and type(rows) is nn.Parameter


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_t5_token_gradient_through_8_bit_t5_is_close_to_full_precision(flux_dir, mode, autocast, one_thread):
    """The token rows' gradient (T5's columns) from one encoding of a prompt with the token, with T5 as train stores
    it (quantize_frozen_text_encoder) against the same T5 unquantized; fp32 and under bf16 autocast, as the step
    runs it; autograd keeps no copy of T5's weights for that backward. Measured on the tiny T5 (2 layers, d_model
    32, d_ff 37), relative L2 error: int8 0.76% in fp32, 0.86% under bf16 autocast; fp8 e4m3 5.0% / 5.1% (3
    mantissa bits); the bounds are about twice and 1.6 times that."""
    from palpcompose import models, quantize
    from palpcompose.tokens import add_trained_tokens

    c = models.load_components(models.resolve_base_model(str(flux_dir)))
    models.freeze(c.unet, c.vae, c.text_encoder)
    token = "<fx-v1>"
    add_trained_tokens(c, {"V1": token}, {"V1": "cat"})
    reference = c.text_encoder
    quantized = copy.deepcopy(reference)
    assert quantize.quantize_frozen_text_encoder(quantized, mode) > 0
    ids = reference.tokenize([f"a photo of {token} on a table", f"{token} in the snow"])

    grads = []
    for encoders in (reference, quantized):
        t5, t5_columns = _encoder(encoders, "t5")
        rows = t5.get_input_embeddings().rows
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            embeds, saved = saved_tensors(lambda e=encoders: e(ids).embeds)  # (B, 512, 32): what Flux reads per token
        if encoders is quantized:  # the wrapper keeps no copy of an 8-bit weight for backward (torchao's linear would)
            shapes = {tuple(m.weight.shape) for m in _linears(t5).values()}
            assert not any(tuple(t.shape) in shapes or tuple(t.shape)[::-1] in shapes for t in saved)
        target = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad((embeds.float() * target).sum(), rows)
        grads.append(grad[:, t5_columns])
    assert grads[0].abs().sum() > 0 and not torch.equal(grads[0], grads[1])  # the 8-bit weights were used ...
    error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert error < {"int8": 0.02, "fp8": 0.08}[mode], error  # ... and give about the same gradient


@needs_torchao
def test_without_t5_tokens_t5_is_left_as_it_was(flow_setup):
    """train.t5_tokens = false: T5 reads the class word, encodes the run's prompts once and leaves for the CPU
    (docs/flow-memory.md "T5 in 8 bits": why it stays out of 8 bits); int8 still quantizes the transformer. T5 is
    cast to the mixed-precision dtype as before, every linear a plain nn.Linear; nothing in DDP's ignore list."""
    state, *_ = flow_setup(mixed_precision="bf16", frozen_weights="int8", t5_tokens=False)
    t5, _ = _encoder(state.components.text_encoder, "t5")
    assert any(type(m) is FrozenQuantLinear for m in state.components.unet.modules())  # the transformer: 8 bits
    assert all(type(m) is nn.Linear and type(m.weight) is nn.Parameter and m.weight.dtype == torch.bfloat16
               for m in _linears(t5).values())
    assert not hasattr(state.components.text_encoder, "_ddp_params_and_buffers_to_ignore")
    assert quantize.quantized_text_encoders(state.components.text_encoder) == []


def test_the_default_leaves_t5_as_it_was(flow_setup):
    """train.frozen_weights = "mixed_precision" with T5 tokens: no layer changes class, T5's weights are the loaded
    values (bit for bit, fp32 as a trained-token encoder is kept), no DDP ignore list."""
    from palpcompose import models

    state, project, config, _ = flow_setup()
    loaded = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
    t5, _ = _encoder(state.components.text_encoder, "t5")
    assert quantize.quantized_text_encoders(state.components.text_encoder) == [t5]  # it would qualify ...
    loaded_t5, _ = _encoder(loaded.text_encoder, "t5")
    assert all(type(m) is nn.Linear for m in state.components.text_encoder.modules() if isinstance(m, nn.Linear))
    for name, m in _linears(t5).items():  # ... but the default stores nothing in 8 bits
        assert type(m.weight) is nn.Parameter and m.weight.dtype == torch.float32, name
        assert torch.equal(m.weight, loaded_t5.get_submodule(name).weight), name
    assert not hasattr(state.components.text_encoder, "_ddp_params_and_buffers_to_ignore")


# --- T5's blocks recomputed in backward (train.recomputes_activations with T5 tokens) ------------------------------


def _t5_pass(state, token: str):
    """y_P for a prompt with `token` through the state's text encoders, then its backward to the token rows, with
    T5's blocks watched. Returns (T5 block computations in the forward, in the backward; the tensors autograd saved
    while a T5 block ran in the forward; the tensors passed to T5's blocks). A block computes when its self-attention
    sublayer runs: in the forward, and again if backward recomputes it."""
    encoders = state.components.text_encoder
    t5, _ = _encoder(encoders, "t5")
    runs, inside, saved, inputs = [], [], [], []
    handles = []

    def enter(block, args, kwargs):
        inside.append(block)
        inputs.extend(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    for block in t5.encoder.block:
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda *_: inside.clear()))
        handles.append(block.layer[0].register_forward_hook(lambda *_: runs.append(1)))

    def pack(t):
        if inside:
            saved.append(t)
        return t

    try:
        ids = encoders.tokenize([f"a photo of {token} on a table"])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            embeds = encoders(ids).embeds
        forward_runs = len(runs)
        torch.autograd.grad(embeds.square().sum(), state.token_embedding.rows)
    finally:
        for handle in handles:
            handle.remove()
    return forward_runs, len(runs) - forward_runs, saved, inputs


def test_with_recomputed_activations_t5_keeps_only_its_blocks_inputs_and_recomputes_each_in_backward(flow_setup):
    """train.gradient_checkpointing with T5 tokens: T5 stays in eval mode (no dropout); while a T5 block runs,
    autograd saves nothing but the blocks' inputs (what the recomputation starts from), and backward computes every
    block once more."""
    state, _, _, tokens = flow_setup(gradient_checkpointing=True)
    t5, _ = _encoder(state.components.text_encoder, "t5")
    blocks = len(t5.encoder.block)
    dropouts = [m for m in t5.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts) and not t5.encoder.training  # eval mode: no dropout
    forward_runs, backward_runs, saved, inputs = _t5_pass(state, tokens["V1"])
    assert forward_runs == blocks and backward_runs == blocks
    assert all(any(t is x for x in inputs) for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("settings", [{}, {"gradient_checkpointing": True, "t5_tokens": False}])
def test_t5s_blocks_are_recomputed_only_with_recomputed_activations_and_t5_tokens(flow_setup, settings):
    """By default T5's blocks run as transformers wrote them: computed once, their activations saved for backward.
    With checkpointing but the token in CLIP only, T5 trains nothing (it encodes the run's prompts once and leaves
    the GPU), and is left as it was, while the transformer is checkpointed."""
    state, _, config, tokens = flow_setup(**settings)
    t5, _ = _encoder(state.components.text_encoder, "t5")
    assert all("forward" not in vars(block) for block in t5.encoder.block)  # no wrapper on any block
    assert state.components.unet.is_gradient_checkpointing == config.train.recomputes_activations
    if config.train.t5_tokens:
        forward_runs, backward_runs, saved, inputs = _t5_pass(state, tokens["V1"])
        assert forward_runs == len(t5.encoder.block) and backward_runs == 0
        assert len([t for t in saved if not any(t is x for x in inputs)]) > 10  # the blocks' activations


@pytest.mark.parametrize("settings", [{}, pytest.param({"frozen_weights": "int8", "mixed_precision": "bf16"},
                                                       marks=needs_torchao)])
def test_recomputing_t5s_blocks_changes_no_gradient_and_no_trained_value(flow_setup, monkeypatch, settings):
    """Two steps with the transformer checkpointed and T5 tokens, T5's blocks recomputed or (the helper replaced by a
    no-op) kept: every gradient of both steps (the LoRA's, the token rows') and every trained value after them are
    bit for bit the same; in fp32, and with T5's 8-bit linears under bf16 autocast. The recomputation ran."""
    from conftest import capture_grads, step_runner

    from palpcompose import flow_step
    from palpcompose.train import prepare_subjects

    runs = {}
    for recompute in (True, False):
        with monkeypatch.context() as patch:
            if not recompute:
                patch.setattr(flow_step, "recompute_t5_blocks", lambda t5: 0)
            state, project, config, tokens = flow_setup(gradient_checkpointing=True, **settings)
        t5, t5_columns = _encoder(state.components.text_encoder, "t5")
        block_runs = []
        for block in t5.encoder.block:
            block.layer[0].register_forward_hook(lambda *_, runs=block_runs: runs.append(1))
        rows_before = state.token_embedding.rows.detach().clone()
        grads = capture_grads(state)
        step = step_runner(state, prepare_subjects(project, config, state, tokens), batch_size=1)
        step()
        step()
        trained = [p.detach().clone() for p in state.lora_params + [state.token_embedding.rows]]
        runs[recompute] = grads, trained, len(block_runs), rows_before
    grads, trained, block_runs, rows_before = runs[True]
    plain_grads, plain_trained, plain_block_runs, _ = runs[False]
    assert block_runs == 2 * plain_block_runs > 0  # each block computed again in backward ...
    assert grads[-1][0][:, t5_columns].abs().sum() > 0  # ... on the gradient's path to the T5 row
    assert [len(g) for g in grads] == [len(g) for g in plain_grads] == [2] * len(grads)
    for mine, plain in zip(grads, plain_grads, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(trained, plain_trained, strict=True))
    assert not torch.equal(trained[-1][:, t5_columns], rows_before[:, t5_columns])  # the T5 row trained


# --- torchao only when 8 bits are asked for -----------------------------------------------------------------------

_PROBE = """
import sys
from palpcompose.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
print("TORCHAO", sys.modules.get("torchao") is not None)
"""


@needs_torchao
@pytest.mark.parametrize("args", [["--help"], ["check", "{root}"], ["render", "{root}", "--base", "--seeds", "0"]])
def test_commands_without_8_bits_never_import_torchao(args, make_project, tmp_path):
    """transformers and diffusers import torchao whenever it is installed, and it prints notices on stderr (CUDA
    extensions, torch's _pytree deprecations): the command line holds it back unless train.frozen_weights asks for
    8 bits (torchao_gate.py). Rendering the base model loads the whole pipeline (every import a command makes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = make_project()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(repo)}
    env.pop("PALP_DEBUG", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    done = subprocess.run([sys.executable, "-c", _PROBE, *[a.format(root=root) for a in args]], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "TORCHAO False" in done.stdout
    for noise in ("torchao", "_pytree", "Failed to load"):
        assert noise not in done.stderr, done.stderr


@needs_torchao
def test_8_bits_let_torchao_through_after_the_libraries_were_imported_without_it():
    """With train.frozen_weights = int8, quantize.check_installed releases torchao even though transformers and
    diffusers were imported while it was held back: the 8-bit layers still work."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys
import torch
from palpcompose import quantize, torchao_gate
torchao_gate.hold_back()
import diffusers, transformers.modeling_utils  # noqa: E401
assert sys.modules.get("torchao") is None
quantize.check_installed("int8", "palp.toml")
model = torch.nn.Sequential(torch.nn.Linear(64, 96)).requires_grad_(False)
assert quantize.quantize_frozen(model, "int8", torch.float32) == 1
print("OK", type(model[0].weight).__module__)
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "OK torchao." in done.stdout
