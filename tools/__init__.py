"""Developer tools for x2l-edge (model conversion, ...). Importable as ``tools.convert``."""
