"""The model: config, export contract, TTDModel, dense features, LoRA, factory, graphs, tokenizer, caption tags and the scoring function."""
