"""ddps."""
