"""Fine-tuning a pretrained GPT: LoRA adapters, task heads and the fine-tune step."""
