"""What stages show: figures, 2-D maps of embeddings, and the before/after report of a stage."""
