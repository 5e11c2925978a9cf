"""Machine learning inside a worker: the model cache, model kinds, PEFT methods, multi-LoRA, features and the
built-in tiny models."""
