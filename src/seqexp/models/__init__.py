"""Model families. Each takes (tokens (B, T), lengths (B,) or None, state) -> (logits, state)."""
