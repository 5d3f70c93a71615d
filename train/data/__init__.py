"""Text, tokenizers, the Grain pipeline of training windows, and prepared corpora."""
