"""`python -m palpcompose.project --schema-md`: print the schema reference (docs/schema.md)."""

from palpcompose.project.schema_doc import main

main()
