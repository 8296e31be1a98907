"""Few-shot evaluation (tasks, scorers, prompt templates) and p-tuning."""
