"""Plain job functions run inside a worker: fine-tune (with its checkpoints), generate and score."""
