"""Pure algorithms: tensors and plain numbers in, ``(value, metrics)`` out (METHODS.md)."""
