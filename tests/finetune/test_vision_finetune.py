"""LoRA on a tiny random Llama 3.2 Vision checkpoint with image + text examples: the loss drops, and the saved
adapter reloads into a fresh model with the same validation loss."""

from __future__ import annotations

import pytest
import torch
from ft_fixtures import one_thread, write_jsonl  # noqa: F401
from mllama_fixtures import save_vision_checkpoint
from PIL import Image

from pocketllama.finetune.trainer import FinetuneConfig, finetune

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_ft")
    save_vision_checkpoint(root / "base")
    records = []
    for i in range(12):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (40 + i, 30 + 2 * i), COLORS[name]).save(root / f"img{i}.png")
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
            {"role": "assistant", "content": f"It is {name}."}], "images": [f"img{i}.png"]})  # relative paths
    write_jsonl(root / "train.jsonl", records)
    return root


def test_vision_lora_trains_saves_and_reloads(vision_data):
    import pocketllama
    from pocketllama.finetune.data import collate, load_examples, split_examples
    from pocketllama.finetune.peft_format import load_adapter
    from pocketllama.finetune.trainer import CausalLMLoss
    from pocketllama.vision import image_processor

    root = vision_data
    cfg = FinetuneConfig(data=str(root / "train.jsonl"), output=str(root / "out"), model=str(root / "base"),
                         max_steps=6, batch_size=2, grad_accum=1, lr=1e-2, lora_r=4, lora_dropout=0.0, eval_every=3,
                         save_every=0, progress=False, val_fraction=0.25)
    result = finetune(cfg, log=lambda _: None)
    evals = [e["eval_loss"] for e in result.evals]
    assert evals[-1] < evals[0] - 0.2
    names = load_adapter((llm := pocketllama.load(root / "base", dtype="float32")).model, root / "out")
    assert any(n.startswith("language_model.") for n in names) and any(n.startswith("vision_model.") for n in names)
    examples, _ = load_examples(root / "train.jsonl", llm.tokenizer, llm.chat_format, max_len=256,
                                image_token_id=llm.config.image_token_index)
    assert examples[0].image == str(root / "img0.png")
    _, val = split_examples(examples, 0.25, seed=0)
    batch = collate([[ex] for ex in val])
    images = image_processor(llm.model, llm.source)([[ex.image] for ex in val])
    llm.model.eval()
    with torch.no_grad():
        loss = CausalLMLoss(llm.model)(batch.input_ids, batch.targets, batch.positions, None, images)
    assert float(loss) / batch.num_targets == pytest.approx(evals[-1], rel=1e-4)


def test_packing_is_refused_with_images(vision_data):
    root = vision_data
    cfg = FinetuneConfig(data=str(root / "train.jsonl"), output=str(root / "packed"), model=str(root / "base"),
                         max_steps=1, batch_size=1, grad_accum=1, packing=True, max_len=256, progress=False)
    with pytest.raises(ValueError, match="packing is not supported with images"):
        finetune(cfg, log=lambda _: None)
