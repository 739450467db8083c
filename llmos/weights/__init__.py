"""Model files: the store (pull, resolve, list, load), GGUF conversion, export and weight packing."""
