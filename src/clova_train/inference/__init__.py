"""Using a trained model: loading it, generation with a key/value cache, and `clova serve` (server, scheduler, filters, playground)."""
