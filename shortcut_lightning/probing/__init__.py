"""Looking inside a model: forward-hook captures, named parts, channel activations, embedding passes, layer finding."""
