"""Model loading, chat formatting and (with the torch executor) the paged forward pass."""
