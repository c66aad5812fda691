"""Tests of the prompt bank: published prompts, long-prompt splitting, tokenization and user prompts."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cmi_clip.clip_utils import build_clip_tokenizer
from cmi_clip.prompt_bank import category_words, load_builtin_prompts, load_prompts, split_description

EOT = 49407


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture
def fresh_model(tiny_clip_dir):
    """A model of its own, for tests that change the prompts."""
    from cmi_clip import CMIClipModel

    return CMIClipModel.from_clip_pretrained(tiny_clip_dir).eval()


def test_mvtec_bank_has_15_categories_as_published():
    prompts = load_builtin_prompts(["mvtec_ad"])
    assert len(prompts) == 15
    assert prompts["bottle"]["abnormality"].startswith("A photo of a anomalous bottle for visual inspection")
    assert prompts["metal_nut"]["normality"].startswith("A photo of a normal metal nut for visual inspection")
    assert "inspec- tion" not in json.dumps(prompts)
    assert "**" not in json.dumps(prompts)


def test_unknown_prompt_set_lists_available():
    with pytest.raises(ValueError, match="Available prompt sets: \\['mvtec_ad', 'visa'\\]"):
        load_builtin_prompts(["mvtec"])


def test_category_words_use_spaces():
    assert category_words("metal_nut") == "metal nut"
    assert category_words("Pipe-Fryum") == "pipe fryum"


def test_fallback_prompt_reads_underscores_as_words(tiny_model):
    sentences = tiny_model.prompt_bank.prompts_for("rubber_gasket").sentences
    assert sentences["abnormality"] == ["a photo of a damaged rubber gasket."]
    assert sentences["normal_anchor"] == ["a photo of a normal rubber gasket."]


def test_unknown_category_warning_names_fix(fresh_model, caplog):
    with caplog.at_level(logging.WARNING, logger="cmi_clip.prompt_bank"):
        fresh_model.prompt_bank.prompts_for("object")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "'object' has no entry in the prompt bank" in messages[0]
    assert "`--category` in `cmi-clip predict`" in messages[0]
    assert "The bank has 27 categories: bottle, cable, candle" in messages[0]


def test_cable_prompt_keeps_every_defect_type(tiny_model, tokenizer, caplog):
    text = tiny_model.config.prompts["cable"]["abnormality"]
    assert len(tokenizer(text, verbose=False)["input_ids"]) > 77
    with caplog.at_level(logging.INFO, logger="cmi_clip.prompt_bank"):
        tiny_model.prompt_bank.clear()
        sentences = tiny_model.prompt_bank.prompts_for("cable").sentences["abnormality"]
    defect_types = ["Bent Wire", "Cable Swap", "Cut Insulation", "Missing Cable", "Missing Wire", "Poke Insulation"]
    assert len(sentences) == len(defect_types)
    for sentence, defect in zip(sentences, defect_types):
        assert defect in sentence
        assert sentence.startswith("A photo of a anomalous cable for visual inspection with the following appearance: ")
        assert len(tokenizer(sentence)["input_ids"]) <= 77
    assert any("cable" in record.getMessage() and "6 sentences" in record.getMessage() for record in caplog.records)


def test_zipper_prompt_is_split_not_truncated(tiny_model, tokenizer):
    sentences = tiny_model.prompt_bank.prompts_for("zipper").sentences["abnormality"]
    assert len(sentences) == 6
    assert "Squeezed Teeth" in sentences[-1]


def test_split_description_by_semicolons():
    text = "A photo of a anomalous x for visual inspection with the following appearance: Crack: Fissure.; Poke: Dent."
    assert split_description(text) == [
        "A photo of a anomalous x for visual inspection with the following appearance: Crack: Fissure.",
        "A photo of a anomalous x for visual inspection with the following appearance: Poke: Dent.",
    ]


def test_long_and_short_prompts_in_one_batch(fresh_model, tokenizer):
    long_text = "A photo of a anomalous widget with the following appearance: " + "; ".join(
        f"Defect {index}: scratch, dent, crack, stain" for index in range(12)
    )
    assert len(tokenizer(long_text, verbose=False)["input_ids"]) > 77
    fresh_model.set_prompts({"widget": {"abnormality": long_text, "normality": "a photo of a normal widget."}})
    long_sentences = fresh_model.prompt_bank.prompts_for("widget").sentences["abnormality"]
    short = "a photo of a normal widget."
    batch = fresh_model.prompt_bank.tokenize([*long_sentences, short])
    assert batch["input_ids"].shape[1] == 77
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        length = int(mask.sum())
        assert row[length - 1] == EOT
        assert (row[length:] == EOT).all()
    alone = fresh_model.prompt_bank.tokenize([short])
    model = fresh_model.clip
    with torch.no_grad():
        together = model.text_model(**batch).pooler_output[-1]
        single = model.text_model(**alone).pooler_output[0]
    assert torch.equal(together, single)


def test_unsplittable_long_prompt_raises(fresh_model):
    text = "a photo of a widget with " + " ".join(["very"] * 90) + " long words"
    fresh_model.set_prompts({"gadget": {"abnormality": text, "normality": "a photo of a normal gadget."}})
    with pytest.raises(ValueError, match="cannot be split"):
        fresh_model.prompt_bank.prompts_for("gadget")


def test_user_prompts_from_json_file(tmp_path, tiny_clip_dir):
    from cmi_clip import CMIClipModel

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"categories": {"My Part": {"abnormality": "a photo of a cracked part.", "normality": "a photo of a clean part."}}}))
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, prompts=str(path))
    assert set(model.config.prompts) == {"my_part"}
    assert model.prompt_bank.prompts_for("my part").sentences["abnormality"] == ["a photo of a cracked part."]


def test_invalid_user_prompts_raise(tmp_path):
    with pytest.raises(ValueError, match="expected an object with the keys 'abnormality' and 'normality'"):
        load_prompts({"part": {"abnormal": "x"}})
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        load_prompts(tmp_path / "missing.json")


def test_user_prompts_dict_with_categories_key(tiny_clip_dir):
    from cmi_clip import CMIClipModel

    prompts = {"categories": {"gasket": {"abnormality": "a photo of a torn gasket.", "normality": "a photo of an intact gasket."}}}
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, prompts=prompts)
    assert set(model.config.prompts) == {"gasket"}
    assert model.prompt_bank.prompts_for("gasket").sentences["normality"] == ["a photo of an intact gasket."]
