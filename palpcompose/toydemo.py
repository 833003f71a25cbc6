"""Moved to palpcompose/toyworld/demo.py (the toy demo's drawing code belongs with the toy world); this module keeps
`from palpcompose.toydemo import ...` working for code written before the move."""

from palpcompose.toyworld.demo import *  # noqa: F401,F403
from palpcompose.toyworld.demo import subject_images, write_references  # noqa: F401
