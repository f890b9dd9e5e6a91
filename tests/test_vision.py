"""Chat with images end to end on a tiny random Llama 3.2 Vision folder: the one-image policy, image part
shapes, `LLM.chat` / `stream_chat` equal to transformers' greedy generation, and the `chat --image` command."""

from __future__ import annotations

import base64
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from mllama_fixtures import (
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    released_intermediate_layers,
    save_vision_checkpoint,
)
from PIL import Image

import pocketllama
from pocketllama.image_processing import cross_attention_mask
from pocketllama.vision import image_processor, image_source, keep_last_image

DOG = Path(importlib.util.find_spec("llama_models").origin).parent / "resources" / "dog.jpg"
PASTA = DOG.with_name("pasta.jpeg")
IMAGE_ID = 128256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vision")
    return path, save_vision_checkpoint(path)


@pytest.fixture(scope="module")
def llm(folder):
    return pocketllama.load(folder[0], dtype="float32")


def user(*parts, text="Describe this image in two sentences") -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_keep_last_image_policy():
    msgs = [user({"type": "image", "image": str(DOG)}), {"role": "assistant", "content": "A dog."},
            user({"type": "image_url", "image_url": {"url": str(PASTA)}}, text="And this one?")]
    with pytest.warns(UserWarning, match=r"1 earlier image\(s\) dropped from the conversation"):
        kept, source = keep_last_image(msgs)
    assert source == str(PASTA)
    assert kept[0]["content"] == [{"type": "text", "text": "Describe this image in two sentences"}]
    assert kept[2]["content"][0] == {"type": "image"} and kept[1] is msgs[1]
    assert msgs[0]["content"][0]["image"] == str(DOG)  # the caller's messages are not modified
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert keep_last_image(msgs[:2])[1] == str(DOG)  # one image: no warning
        assert keep_last_image([{"role": "user", "content": "hi"}]) == ([{"role": "user", "content": "hi"}], None)


@pytest.mark.parametrize("part, expected", [
    ({"type": "image", "image": "a.png"}, "a.png"), ({"type": "image", "url": "data:x"}, "data:x"),
    ({"type": "image", "path": "p.jpg"}, "p.jpg"), ({"type": "image_url", "image_url": {"url": "u"}}, "u"),
    ({"type": "image_url", "image_url": "u2"}, "u2"), ({"type": "input_image", "image_url": "u3"}, "u3"),
])
def test_image_part_shapes(part, expected):
    assert image_source(part) == expected


def test_image_part_without_image():
    with pytest.raises(ValueError, match=r"message 0 image part has no image: use \{'type': 'image', 'image'"):
        keep_last_image([user({"type": "image"})])


def test_chat_with_image_equals_transformers_greedy(folder, llm):
    from transformers import MllamaImageProcessorPil

    path, ref = folder
    msgs = [user({"type": "image", "image": str(DOG)})]
    stream = list(llm.stream_chat(msgs, max_tokens=12))
    ids = llm.apply_chat_template(msgs)
    assert ids.count(IMAGE_ID) == 1 and stream[-1].prompt_tokens == len(ids) == 17
    hf = MllamaImageProcessorPil.from_pretrained(path)(images=[[Image.open(DOG)]], return_tensors="pt")
    with released_intermediate_layers(), torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=hf["pixel_values"],
                           aspect_ratio_ids=hf["aspect_ratio_ids"], aspect_ratio_mask=hf["aspect_ratio_mask"],
                           cross_attention_mask=cross_attention_mask([ids], hf["num_tiles"], IMAGE_ID),
                           max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert [r.token for r in stream] == out[0, len(ids):].tolist()
    answer = llm.chat(msgs, max_tokens=12)
    assert answer == {"role": "assistant", "content": "".join(r.text for r in stream)}


def test_every_image_source_kind_gives_the_same_answer(llm):
    data = DOG.read_bytes()
    kinds = [str(DOG), DOG, data, Image.open(DOG), "data:image/jpeg;base64," + base64.b64encode(data).decode()]
    answers = {llm.chat([user({"type": "image", "image": k})], max_tokens=4)["content"] for k in kinds}
    assert len(answers) == 1


def test_image_in_earlier_turn_still_attended(llm):
    first = [user({"type": "image", "image": str(DOG)})]
    follow = [*first, {"role": "assistant", "content": "A dog on a skateboard."},
              {"role": "user", "content": "What colour is it?"}]
    without = [user(text="Describe this image in two sentences"), *follow[1:]]
    a = [r.token for r in llm.stream_chat(follow, max_tokens=6)]
    b = [r.token for r in llm.stream_chat(without, max_tokens=6)]
    assert a != b  # the image from turn 1 changes the answer in turn 2


def test_text_only_chat_on_vision_model(llm):
    msgs = [{"role": "user", "content": "Hello"}]
    ids = llm.apply_chat_template(msgs)
    assert IMAGE_ID not in ids and "Cutting Knowledge" in llm.tokenizer.decode(ids)
    with torch.no_grad():
        expected = llm.model(torch.tensor([ids]))[0, -1].argmax().item()
    assert next(llm.stream_chat(msgs, max_tokens=1)).token == expected


def test_images_on_a_text_model_fail_clearly(tiny_llama_dir):
    from tokenizer_assets import llama3

    from pocketllama.llm import LLM, load_model

    model, _ = load_model(tiny_llama_dir[0])
    text_llm = LLM(model=model, tokenizer=llama3(), config=model.config, source=tiny_llama_dir[0])
    with pytest.raises(ValueError, match="is a text-only model; images need a Llama 3.2 Vision model"):
        text_llm.chat([user({"type": "image", "image": str(DOG)})])


def test_truncate_left_refused_with_images(llm):
    with pytest.raises(ValueError, match="truncate='left' is not supported with images"):
        list(llm.stream_chat([user({"type": "image", "image": str(DOG)})], truncate="left"))


def test_processor_must_match_model_tiles(folder, llm, tmp_path):
    assert image_processor(llm.model, folder[0]).tile_size == 28
    assert image_processor(llm.model).tile_size == 28  # no preprocessor_config.json: the model's image_size
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 560, "width": 560}}))
    with pytest.raises(ValueError, match=r"tiles of 560 px \(max 4\) do not match the model's image_size 28"):
        image_processor(llm.model, tmp_path)


# ---- CLI: pocketllama chat --image ------------------------------------------------------------------


def test_cli_one_shot_with_image(folder, capsys):
    from pocketllama.commands import chat

    rc = chat.main(["-m", str(folder[0]), "--dtype", "float32", "--image", str(DOG), "--max-tokens", "5",
                    "--stats", "Describe this image"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "[14 prompt tokens at" in out.err, out.err  # BOS, header, <|image|>, 3 words, <|eot_id|>, header


@pytest.mark.parametrize("args, message", [
    (["--image", "/no/such.png", "hi"], "image file '/no/such.png' does not exist"),
    (["--image", __file__, "hi"], "is not an image Pillow can read"),
])
def test_cli_image_errors(folder, capsys, args, message):
    from pocketllama.commands import chat

    rc = chat.main(["-m", str(folder[0]), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "pocketllama: error: " in err and message in err, err
