"""Desktop side: models, checkpoints, tokenizer, pretraining, lowering to the engines."""
