"""Using a trained model: loading and exporting it, generation and perplexity, fine-tuning on tasks."""
