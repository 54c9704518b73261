"""The megatron-core engine: kmoe's model as a megatron GPTModel (spec.py), weight conversion (convert.py)."""
