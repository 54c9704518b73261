"""kmoe data preparation: sources, cleaning steps, tokenizer training and Megatron token shards."""
