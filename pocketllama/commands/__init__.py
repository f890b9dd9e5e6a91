"""Command modules of the `pocketllama` CLI; each has `main(argv) -> int`."""
