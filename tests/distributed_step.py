"""One optimizer step on two fixed samples, for tests/test_distributed.py (not a test module itself).

    python distributed_step.py PROJECT OUT.safetensors

Alone, the step trains on both samples as one batch of 2. Under a launcher of 2 processes (torchrun), process r
trains on sample r alone and DistributedDataParallel averages the gradients. Either way the main process writes
the LoRA weights and placeholder rows before and after the step, and AdamW's first moments (the gradient), to OUT;
the test compares the two files.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from palpcompose import distributed, models
from palpcompose.data import Batch, sample_batch
from palpcompose.guidance import guidance_config
from palpcompose.project import load_project
from palpcompose.train import prepare_state, prepare_subjects, trained_weights, training_step

SAMPLES = 2


def one_step(project_dir, out_file) -> None:
    project = load_project(project_dir)
    config = project.config
    accelerator = distributed.make_accelerator("no", 1)
    components = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
    tokens = models.placeholder_tokens(config.project.name, config.subjects)
    state = prepare_state(config, components, accelerator, guidance_config(config), tokens)
    subjects = prepare_subjects(project, config, state, tokens)
    # The same two samples on every process (one generator, one seed), then each process keeps its share
    both = sample_batch(subjects, torch.Generator().manual_seed(1234), SAMPLES,
                        components.noise_scheduler.config.num_train_timesteps)
    n, rank = accelerator.num_processes, accelerator.process_index
    share = slice(rank * SAMPLES // n, (rank + 1) * SAMPLES // n)
    batch = Batch(both.latents[share], both.noise[share], both.fresh_noise[share], both.timesteps[share],
                  both.input_ids[share], both.subjects[share])
    before = trained_weights(state, config, tokens, 0)
    training_step(state, batch)
    if accelerator.is_main_process:
        after = trained_weights(state, config, tokens, 1)
        tensors = {}
        for when, weights in (("before", before), ("after", after)):
            tensors.update({f"{when}.lora.{k}": v for k, v in weights.lora.items()})
            tensors.update({f"{when}.rows.{k}": v for k, v in weights.embeddings.items()})
        # AdamW's first moment after one step is (1 - beta1) x the (averaged, clipped) gradient
        for i, moments in state.optimizer.state_dict()["state"].items():
            tensors[f"exp_avg.{i}"] = moments["exp_avg"].cpu()
        save_file(tensors, str(out_file))
    distributed.barrier(accelerator)


if __name__ == "__main__":
    one_step(sys.argv[1], sys.argv[2])
