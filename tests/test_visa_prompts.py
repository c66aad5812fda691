# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Checks of the built-in VisA prompt bank: its categories, its wording and its fit in CLIP's context."""

from __future__ import annotations

import json

import pytest

from cmi_clip.clip_utils import build_clip_tokenizer
from cmi_clip.prompt_bank import PROMPTS_DIR, load_builtin_prompts, split_description

VISA_CATEGORIES = {
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
}
CLIP_CONTEXT_LENGTH = 77


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def visa_prompts():
    return load_builtin_prompts(["visa"])


def test_visa_keys_are_the_12_categories(visa_prompts):
    assert set(visa_prompts) == VISA_CATEGORIES
    assert len(visa_prompts) == 12


def test_visa_file_keys_match_folder_names():
    with open(PROMPTS_DIR / "visa.json", encoding="utf-8") as handle:
        data = json.load(handle)

    assert data["name"] == "visa"
    assert set(data["categories"]) == VISA_CATEGORIES
    assert "not published" in data["description"]


def test_visa_shares_no_key_with_mvtec(visa_prompts):
    mvtec_prompts = load_builtin_prompts(["mvtec_ad"])

    assert set(visa_prompts).isdisjoint(mvtec_prompts)


def test_visa_prompts_follow_template(visa_prompts):
    for category, entry in visa_prompts.items():
        abnormality_prefix, _, defects = entry["abnormality"].partition(":")
        normality_prefix, _, appearance = entry["normality"].partition(":")

        assert abnormality_prefix.startswith("A photo of a anomalous "), category
        assert abnormality_prefix.endswith(" for visual inspection with the following appearance"), category
        assert normality_prefix.startswith("A photo of a normal "), category
        assert normality_prefix.endswith(" for visual inspection with the following appearance"), category
        assert appearance.strip(), category
        # Every defect type has a name and at least one synonym ("Name: synonym, synonym").
        for part in defects.split(";"):
            name, colon, synonyms = part.partition(":")
            assert colon, (category, part)
            assert name.strip(), (category, part)
            assert synonyms.strip(" ."), (category, part)


@pytest.mark.parametrize("role", ["abnormality", "normality"])
def test_visa_parts_fit_clip_context(visa_prompts, tokenizer, role):
    for category, entry in visa_prompts.items():
        # Each part is the shared prefix plus one semicolon-separated defect type or, without semicolons, the whole text.
        for part in split_description(entry[role]):
            length = len(tokenizer(part, truncation=False)["input_ids"])
            assert length <= CLIP_CONTEXT_LENGTH, (category, role, length, part)


def test_visa_long_abnormality_splits_per_defect(visa_prompts, tokenizer):
    candle = visa_prompts["candle"]["abnormality"]
    defect_count = candle.partition(":")[2].count(";") + 1
    parts = split_description(candle)

    assert len(tokenizer(candle, truncation=False)["input_ids"]) > CLIP_CONTEXT_LENGTH
    assert len(parts) == defect_count
    assert all(part.startswith("A photo of a anomalous candle for visual inspection") for part in parts)
