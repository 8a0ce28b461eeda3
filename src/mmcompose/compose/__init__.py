"""Model composition: merge methods (``compose.methods``) as pure tensor functions by name."""
