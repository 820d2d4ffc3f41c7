"""BLIP-family checkpoints built from scratch: the real transformers classes with random weights and
tokenizers built locally that follow the real checkpoints' special-token conventions. `blip demo`
trains its models from these; the tests and benchmarks use tiny ones (tests.builders)."""
