"""pocketllama: run the Llama 3.2 family (text, vision, guard) on your own machine."""

__version__ = "0.1.0"
