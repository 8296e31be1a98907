"""--init-from: a run that starts from a Hugging Face model directory (its weights read straight into each rank's share, its embedding rows grafted onto another tokenizer)."""
