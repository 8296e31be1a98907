"""Raw text: corpus readers for every input format, normalisation and cleaning."""
