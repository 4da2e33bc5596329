"""The model: where its files come from (source), how it is loaded (loading), at what precision (precision), its
prompts (chat)."""
