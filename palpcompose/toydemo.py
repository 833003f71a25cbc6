"""Moved to palpcompose/toyworld/demo.py (the toy demo's drawing code belongs with the toy world); this module keeps
`from palpcompose.toydemo import ...` working for code written before the move."""

from palpcompose.toyworld.demo import artwork_image, artwork_images, subject_images, write_references

__all__ = ["artwork_image", "artwork_images", "subject_images", "write_references"]
