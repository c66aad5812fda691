# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Prompt bank: per-category abnormality and normality descriptions, and their tokenization.

A bank maps a category name to two descriptions: an *abnormality* prompt (the defect types with short
descriptions) and a *normality* prompt (the normal appearance). The built-in banks are JSON files in
the `prompts/` folder of the package. A description longer than CLIP's text context (77 tokens) is
split into one sentence per defect type, and the model averages the sentence embeddings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
ROLES = ("abnormality", "normality", "normal_anchor", "abnormal_anchor")


def normalize_category(name: str) -> str:
    """Return the bank key of a category name: lower case, with spaces and hyphens as underscores."""
    return "_".join(str(name).strip().lower().replace("-", " ").split())


def category_words(name: str) -> str:
    """Return a category name as words for a prompt (`metal_nut` -> `metal nut`)."""
    return normalize_category(name).replace("_", " ")


def _read_prompt_json(path: Path) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    categories = data.get("categories", data) if isinstance(data, dict) else None
    if not isinstance(categories, dict):
        msg = f"Prompt file {path} must contain a JSON object of category -> {{'abnormality', 'normality'}}."
        raise ValueError(msg)
    return validate_prompts(categories, source=str(path))


def validate_prompts(prompts: dict[str, Any], source: str = "prompts") -> dict[str, dict[str, str]]:
    """Check a category -> {"abnormality": str, "normality": str} mapping and normalise its keys."""
    result: dict[str, dict[str, str]] = {}
    for name, entry in prompts.items():
        if not isinstance(entry, dict) or not {"abnormality", "normality"} <= set(entry):
            msg = (
                f"Entry {name!r} in {source} is invalid: expected an object with the keys 'abnormality' and "
                f"'normality', got {entry!r}."
            )
            raise ValueError(msg)
        for role in ("abnormality", "normality"):
            if not isinstance(entry[role], str) or not entry[role].strip():
                msg = f"Entry {name!r} in {source} has an empty or non-text {role!r} prompt: {entry[role]!r}."
                raise ValueError(msg)
        result[normalize_category(name)] = {"abnormality": entry["abnormality"], "normality": entry["normality"]}
    return result


def available_prompt_sets() -> list[str]:
    """List the names of the built-in prompt banks."""
    return sorted(path.stem for path in PROMPTS_DIR.glob("*.json"))


def load_builtin_prompts(names: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Load and merge built-in prompt banks by name (later banks win on a shared category)."""
    merged: dict[str, dict[str, str]] = {}
    for name in names:
        path = PROMPTS_DIR / f"{name}.json"
        if not path.is_file():
            msg = f"Unknown prompt set {name!r}. Available prompt sets: {available_prompt_sets()}."
            raise ValueError(msg)
        merged.update(_read_prompt_json(path))
    return merged


def load_prompts(source: str | os.PathLike | dict[str, Any]) -> dict[str, dict[str, str]]:
    """Load user prompts from a dict or a JSON file (flat, or with a top-level `categories` object)."""
    if isinstance(source, dict):
        categories = source.get("categories", source)
        return validate_prompts(categories, source="the prompts dict")
    path = Path(source)
    if not path.is_file():
        msg = f"Prompt file {path} not found. Pass a JSON file of category -> {{'abnormality', 'normality'}}."
        raise FileNotFoundError(msg)
    return _read_prompt_json(path)


def split_description(text: str) -> list[str]:
    """Split a description into one sentence per defect type, each keeping the shared prefix.

    `"A photo of ... appearance: Crack: Fissure.; Poke: Dent."` becomes
    `["A photo of ... appearance: Crack: Fissure.", "A photo of ... appearance: Poke: Dent."]`. The
    prefix is the text up to the first colon. Defect types are separated by semicolons, or by commas when
    the description has no semicolon.
    """
    prefix, colon, body = text.partition(":")
    if not colon:
        prefix, body = "", text
    separator = ";" if ";" in body else ","
    parts = [part.strip() for part in body.split(separator) if part.strip(" .")]
    head = f"{prefix.strip()}: " if colon else ""
    return [head + part for part in parts] if len(parts) > 1 else [text]


@dataclass
class CategoryPrompts:
    """Sentences of one category, per role (abnormality, normality, and the two generic anchors)."""

    category: str
    sentences: dict[str, list[str]]
    from_bank: bool


class PromptBank:
    """Texts of the four prompt roles per category, and their tokenization into CLIP's context."""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._warned_unknown: set[str] = set()
        self._texts: dict[str, CategoryPrompts] = {}

    @property
    def context_length(self) -> int:
        """Number of tokens in CLIP's text context, start and end tokens included."""
        return int(self.config.clip_config.text_config.max_position_embeddings)

    def count_tokens(self, text: str) -> int:
        """Count tokens of a text, start and end tokens included, without truncating."""
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def _fit_to_context(self, category: str, role: str, text: str) -> list[str]:
        length = self.count_tokens(text)
        if length <= self.context_length:
            return [text]
        if not self.config.split_long_prompts:
            msg = (
                f"The {role} prompt of {category!r} has {length} tokens, more than CLIP's {self.context_length}. "
                "Shorten it, or set split_long_prompts=True to average one embedding per defect type."
            )
            raise ValueError(msg)
        sentences = split_description(text)
        too_long = [(s, self.count_tokens(s)) for s in sentences if self.count_tokens(s) > self.context_length]
        if too_long:
            sentence, count = too_long[0]
            msg = (
                f"The {role} prompt of {category!r} cannot be split to fit CLIP's {self.context_length}-token "
                f"context: the part {sentence!r} still has {count} tokens. Shorten that defect description."
            )
            raise ValueError(msg)
        logger.info(
            "The %s prompt of %r has %d tokens, more than CLIP's %d: using the mean embedding of %d "
            "sentences, one per defect type.",
            role,
            category,
            length,
            self.context_length,
            len(sentences),
        )
        return sentences

    def prompts_for(self, category: str) -> CategoryPrompts:
        """Return the sentences of every role for `category`, falling back to generic templates."""
        key = normalize_category(category)
        if key in self._texts:
            return self._texts[key]
        words = category_words(category)
        entry = self.config.prompts.get(key)
        if entry is None:
            if key not in self._warned_unknown:
                bank_categories = sorted(self.config.prompts)
                logger.warning(
                    "Category %r has no entry in the prompt bank, so generic prompts (%r / %r) are used. "
                    "Pass the product's category (`category=` in the pipeline, `--category` in `cmi-clip predict`) "
                    "or prompts for it (a dict or a JSON file) for better results. The bank has %d categories: %s.",
                    category,
                    self.config.fallback_abnormality_template.format(words),
                    self.config.fallback_normality_template.format(words),
                    len(bank_categories),
                    ", ".join(bank_categories[:20]) + (", ..." if len(bank_categories) > 20 else ""),
                )
                self._warned_unknown.add(key)
            entry = {
                "abnormality": self.config.fallback_abnormality_template.format(words),
                "normality": self.config.fallback_normality_template.format(words),
            }
        texts = {
            "abnormality": entry["abnormality"],
            "normality": entry["normality"],
            "normal_anchor": self.config.normal_anchor_template.format(words),
            "abnormal_anchor": self.config.abnormal_anchor_template.format(words),
        }
        sentences = {role: self._fit_to_context(key, role, texts[role]) for role in ROLES}
        result = CategoryPrompts(category=key, sentences=sentences, from_bank=key in self.config.prompts)
        self._texts[key] = result
        return result

    def tokenize(self, sentences: list[str]) -> dict[str, Any]:
        """Tokenize sentences padded to the full context, so a row never depends on its batch."""
        return self.tokenizer(
            sentences,
            padding="max_length",
            max_length=self.context_length,
            truncation=False,
            return_tensors="pt",
        )

    def clear(self) -> None:
        """Forget the split sentences, after the prompts or the tokenizer changed."""
        self._texts.clear()


__all__ = [
    "PromptBank",
    "CategoryPrompts",
    "available_prompt_sets",
    "category_words",
    "load_builtin_prompts",
    "load_prompts",
    "normalize_category",
    "split_description",
    "validate_prompts",
]
