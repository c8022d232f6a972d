"""Pretrained weights shipped inside the package (zoo/weights/), loaded offline.

(Interface fixed; the train package fills it in.)
    available_tags(model_name) -> list[str]
    load(model_name, tag, *, dtype, **options) -> Classifier in eval mode
"""

from __future__ import annotations


def available_tags(model_name: str) -> list[str]:
    return []


def load(model_name: str, tag: str, *, dtype=None, **options):
    raise ValueError(f"no pretrained weights {tag!r} for {model_name}; `zoo list` shows which models have weights")
