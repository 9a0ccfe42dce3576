"""The data side: IMDB, k-shot prompts and opposite-sentiment pairs, the decision rule."""
