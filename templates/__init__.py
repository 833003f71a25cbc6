"""Project templates for `palpcompose init` (shipped inside the package as `palpcompose.templates`)."""
