"""LoRA: the adapter config, applying and merging adapters on the model, PEFT adapter files."""
