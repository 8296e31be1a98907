"""`clova dedup`: MinHash-LSH near-duplicate removal and Korean quality filtering on datatrove (above tokenizer: it shingles MeCab-ko morphemes)."""
