"""Engine adapters and model variants: llama.cpp replicas and OpenAI-compatible servers."""
