import policies  # noqa: F401  (first: its __init__ quiets a library notice before loop imports those libraries)
