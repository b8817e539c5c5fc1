"""Built-in components, one module per kind; each module lists its classes in COMPONENTS."""
