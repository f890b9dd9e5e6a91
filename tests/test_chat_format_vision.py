"""The Llama 3 chat format with images (SPEC 5.4): golden ids of SPEC 5.5 (d), system-block rules, errors."""

from __future__ import annotations

import pytest
from tokenizer_assets import llama3

from pocketllama.chat_format import Llama3ChatFormat, get_chat_format, has_image

DATE = "26 Jul 2024"
IMAGE_ID = 128256
SPEC_D_IDS = [128000, 128006, 882, 128007, 271, 128256, 75885, 420, 2217, 304, 1403, 23719, 128009, 128006, 78191,
              128007, 271]
SPEC_D_TEXT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image in two "
               "sentences<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def describe(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this image in two sentences"}]}]


@pytest.fixture(scope="module")
def vision_format() -> Llama3ChatFormat:
    return get_chat_format(llama3(), image_token_id=IMAGE_ID)


@pytest.mark.parametrize("part", [{"type": "image"}, {"type": "image_url", "image_url": {"url": "data:..."}},
                                  {"type": "input_image", "image_url": "x.png"}])
def test_spec_5_5_d_golden_ids(vision_format, part):
    msgs = describe(part)
    assert vision_format.encode(msgs, date_string=DATE) == SPEC_D_IDS
    assert vision_format.render(msgs, date_string=DATE) == SPEC_D_TEXT


def test_image_between_texts_untrimmed_and_later_turns(vision_format):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                         {"type": "text", "text": " what is it? "}]},
            {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "  Its colour?"}]
    text = vision_format.render(msgs)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nLook: <|image|> what is "
                           "it? <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA dog.<|eot_id|>")
    assert "Its colour?<|eot_id|>" in text and "Cutting Knowledge" not in text
    ids = vision_format.encode(msgs)
    assert ids.count(IMAGE_ID) == 1 and ids[ids.index(IMAGE_ID) - 1] == llama3().encode("Look: ")[-1]


def test_caller_system_message_kept_without_date_lines(vision_format):
    msgs = [{"role": "system", "content": " Be brief. "}, *describe({"type": "image"})]
    assert vision_format.render(msgs).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|>")


def test_text_only_chat_keeps_default_system_block(vision_format):
    msgs = [{"role": "user", "content": "Who are you?"}]
    assert vision_format.encode(msgs, date_string=DATE) == get_chat_format(llama3()).encode(msgs, date_string=DATE)


def test_several_images_each_get_a_token(vision_format):
    ids = vision_format.encode(describe({"type": "image"}, {"type": "image"}))
    assert ids[5:7] == [IMAGE_ID, IMAGE_ID]


def test_has_image():
    assert has_image(describe({"type": "image"})[0])
    assert not has_image({"role": "user", "content": "image"}) and not has_image("not a message")


@pytest.mark.parametrize(
    "msgs, kwargs, message",
    [
        (describe({"type": "image"}), {"tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools cannot be combined with images"),
        ([{"role": "assistant", "content": [{"type": "image"}]}], {}, "message 0: images go in user messages, not "
                                                                     "in a 'assistant' message"),
        (describe({"type": "image"}, {"type": "audio"}), {}, r"content part \{'type': 'audio'\} is not supported"),
    ],
)
def test_errors(vision_format, msgs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vision_format.encode(msgs, **kwargs)


def test_text_format_still_refuses_images():
    with pytest.raises(ValueError, match="message 0: image content requires a vision model"):
        get_chat_format(llama3()).encode(describe({"type": "image"}))
