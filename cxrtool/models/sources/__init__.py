"""Where models come from besides cxrtool's own training: other libraries' weight sets,
imported once into ordinary cxrtool checkpoints."""
