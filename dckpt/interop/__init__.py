"""Other formats: torch DCP checkpoints, safetensors, Hugging Face and ``torch.save`` files,
and conversion between them and dckpt. The engine never imports this package."""
