"""The model layer: loading a base, the adapter format, the Llama-family forward and reward
scoring. Both the server and the learner build on it; it imports torch, transformers, peft and
safetensors only."""
