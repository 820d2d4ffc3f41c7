"""CLIP-feature diffusion: a DiT over target-encoder tokens (by default CLIP ViT-L/14's, conditioned on
EVA ViT-g/14's), trained with rectified flow and sampled with an ODE solver. BLIP3-o's flow-matching
recipe on another task: its own head generates EVA-CLIP features from a language model's hidden
states (docs/architecture.md, "The DiT").

- config.py        DiTConfig, FlowConfig, size presets, the choices (no torch import)
- train_config.py  TrainDiTConfig: the sections of `blip train-dit` (no torch import)
- model.py         DiT: velocity network, a pure nn.Module
- flow.py          the path x_t, timestep sampling, flow_loss
- solver.py        Euler / Heun, classifier-free guidance, generate()
- normalize.py     target token normalisation (none / l2 / standardize) with streaming statistics
- data.py          the split, the global sample order, the per-batch noise, the eval set
- evaluate.py      held-out metrics (val_loss, vel_cos, patch_cos, global_cos, est_r@1)
- train.py         `blip train-dit`: the DiT task on the training engine
- checkpoint.py    DiT exports: write_export, load_dit
- sample.py        `blip sample`: SampleConfig, run_sample
"""
