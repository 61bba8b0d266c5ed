"""The sm Jupyter kernel: every cell runs inside a microVM."""
