"""Off the device what a flow family's training step never runs (issue 21 item 3; docs/flow-memory.md): the text
encoders that hold no learned token (T5 with `train.t5_tokens = false`, which reads the class word) and the VAE.

The step still reads what such an encoder makes of each personalization prompt, so before it leaves, it encodes
every prompt it will be asked for during the run, once: each subject's prompt, each image's caption (when
`train.captions` gives one), and, when previews are drawn, the preview prompts and the negative prompts of their
guidance. models.flow.FlowTextEncoders.cache_idle keeps those encodings and serves them in the encoder's place
(the step, the previews' pipeline); the encodings are made on the training device, without gradients, under the
step's autocast, one prompt at a time: the values the step would get from the encoder for a batch of one. Nothing
of this is saved: a resumed run makes the same cache at its setup.
"""

from __future__ import annotations

import torch

from palpcompose import models
from palpcompose.data import SubjectData
from palpcompose.previews import preview_prompts
from palpcompose.step import TrainState, offload_vae

OFFLOAD_IDLE_ENCODERS = True  # tests switch it off to compare with the encoders kept on the device


def offload_idle_modules(state: TrainState, config, tokens: dict[str, str], subjects: list[SubjectData]) -> list[str]:
    """After the latents are cached (train.setup): the encoders without a learned token encode the run's prompts
    once and move to the CPU, and so does the VAE (previews bring it back: step.vae_on_device). Returns the keys of
    the encoders moved ("t5"), for the setup's message."""
    moved = []
    if OFFLOAD_IDLE_ENCODERS:
        encoders = state.accelerator.unwrap_model(state.text_encoder)
        moved = encoders.cache_idle(run_prompt_ids(state.components, config, tokens, subjects),
                                    state.accelerator.autocast())
    offload_vae(state)  # empties the CUDA cache, for the encoders too
    return moved


def run_prompt_ids(c: models.Components, config, tokens: dict[str, str], subjects: list[SubjectData]) -> torch.Tensor:
    """The token ids (N, sum of lengths) of every prompt the text encoders get during the run: the subjects'
    personalization prompts and captions (as data.SubjectData holds them), and with previews their prompts
    (previews.preview_prompts and the x0-hat rows' target prompt with class words) and negative prompts ("", and
    render.negative_prompt for real CFG)."""
    ids = [s.input_ids for s in subjects] + [row for s in subjects for row in (s.image_ids or [])]
    if config.train.preview_every:
        prompts = [prompt for _, prompt in preview_prompts(config, tokens)] + ["", config.render.negative_prompt]
        if config.palp.target_prompt:
            class_words = {k: s.class_name for k, s in config.subjects.items()}
            prompts.append(models.expand_placeholders(config.palp.target_prompt, class_words))
        ids += list(c.tokenize(prompts))
    return torch.stack(ids)
