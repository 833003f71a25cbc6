"""Research experiments on palpcompose (not part of the installed package): run from the repository root."""
