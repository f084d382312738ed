"""Knowledge pipeline: descriptions, prompts, generation, encoding and the store."""
