"""gptjax: GPT-2 training and inference in JAX/Flax NNX, from a laptop CPU to a TPU pod."""

__version__ = "0.1.0"
