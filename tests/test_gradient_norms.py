"""train.jsonl's `grad_pers` and `grad_align`: the norms of the two loss terms' gradients w.r.t. the UNet's prediction.

Checked against what autograd actually delivers to the prediction in the step's own backward pass (a hook on the
personalization pass's output): with guidance `none` that gradient IS the personalization term's; with `palp` (same
seeds, so the same batch and the same prediction) the difference of the two is lambda times the alignment term's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import prepared_state, step_runner

from palpcompose.guidance import PalpGuidance

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 2


def engine(make_project, mode: str, weight: float = 1.0):
    """The training step of a tiny project (the same images, seeds and batches whatever `mode`), its LoRA random."""
    root = make_project({"train": {"batch_size": BATCH}}, dirname=f"{mode}-{weight}")
    state, subjects = prepared_state(root, mode)
    state.guidance = PalpGuidance(dataclasses.replace(state.guidance.config, weight=weight),
                                  state.guidance.parameterisation)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in state.lora_params:  # B = 0 at init would make the adapter a no-op
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return state, step_runner(state, subjects, BATCH)


def prediction_grads(state) -> list[torch.Tensor]:
    """Every gradient autograd delivers to the personalization prediction (the grad-enabled UNet call; the
    guidance's passes run without gradients), in order."""
    grads = []

    def hook(module, args, output):
        if torch.is_grad_enabled():
            output.sample.register_hook(lambda g: grads.append(g.detach().clone()))

    state.accelerator.unwrap_model(state.unet).register_forward_hook(hook)
    return grads


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_logged_gradient_norms_are_the_terms_gradients_on_the_prediction(make_project, weight):
    plain, plain_step = engine(make_project, "none")
    palp, palp_step = engine(make_project, "palp", weight=weight)
    plain_grads, palp_grads = prediction_grads(plain), prediction_grads(palp)
    logged_plain, logged_palp = plain_step(), palp_step()  # one step: after it the two models differ
    # the last gradient the prediction received is the step's backward pass (any earlier ones are the logging's)
    pers, total = plain_grads[-1], palp_grads[-1]
    assert "grad_align" not in logged_plain
    assert logged_plain["grad_pers"] == pytest.approx(pers.norm().item(), rel=1e-4)
    assert logged_palp["grad_pers"] == pytest.approx(pers.norm().item(), rel=1e-4)
    align = total - pers  # lambda * d L_align / d pred
    assert align.norm().item() > 1e-3 * pers.norm().item()  # the alignment term is there to be measured
    assert logged_palp["grad_align"] == pytest.approx(align.norm().item(), rel=1e-3)
