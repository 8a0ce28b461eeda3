"""Training single-modality MLLMs (projector stage, LoRA stage), DDP under torchrun."""
