"""neuromerge: merge fine-tuned checkpoints of one base model, neuron by neuron."""

__version__ = "0.1.0"
