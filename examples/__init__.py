"""Example policies for milter-bridge, each runnable on its own: ``python examples/<name>.py``."""
