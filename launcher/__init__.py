"""launcher: fine-tune language models on downstream tasks from one YAML recipe."""

__version__ = "0.1.0"
