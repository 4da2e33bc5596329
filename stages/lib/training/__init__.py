"""Training: the set-up phases (setup), LoRA, speed-ups and their kernels, FSDP, launching, callbacks, checkpoints."""
