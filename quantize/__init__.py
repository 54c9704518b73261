"""kmoe quantization: serving artifacts (GPTQ, GGUF, bitsandbytes) with measured quality and provenance."""
