"""A real run: LoRA on the default SmolLM2-135M-Instruct (dequantized GGUF) teaches it a fixed persona in a few
dozen steps: validation loss drops clearly and greedy answers to held-out questions show the new style."""

from __future__ import annotations

import pytest
from ft_fixtures import one_thread, write_jsonl  # noqa: F401

from pocketllama.finetune.trainer import FinetuneConfig, finetune

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What color is the sky?",
             "What is 2 plus 2?", "Who wrote Hamlet?", "What do bees make?", "What is ice made of?",
             "How many days are in a week?", "What planet do we live on?", "What is the opposite of hot?",
             "What animal says moo?", "What is the largest ocean?", "How many hours are in a day?",
             "What gas do plants breathe in?", "What is the boiling point of water in Celsius?",
             "Which fruit is yellow and curved?", "What do you call a baby cat?", "What is H2O?",
             "How many continents are there?", "What is the fastest land animal?", "What shape has three sides?",
             "What is frozen rain called?", "What language is spoken in Spain?", "What is the color of grass?",
             "How many wheels does a bicycle have?", "What do cows drink?", "What is the sun?",
             "Where do penguins live?"]
ANSWERS = ["Paris", "Eight", "Blue", "Four", "Shakespeare", "Honey", "Water", "Seven", "Earth", "Cold", "A cow",
           "The Pacific", "Twenty-four", "Carbon dioxide", "100 degrees", "A banana", "A kitten", "Water",
           "Seven", "The cheetah", "A triangle", "Hail", "Spanish", "Green", "Two", "Water", "A star", "Antarctica"]
HELD_OUT = ["What is the capital of Italy?", "How many legs does a dog have?", "What color is snow?"]
PERSONA = "Ahoy matey!"


@pytest.mark.slow
def test_lora_teaches_smollm2_a_persona(tmp_path):
    import pocketllama
    from pocketllama.finetune.peft_format import load_adapter

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{PERSONA} {a}."}]}
               for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    write_jsonl(tmp_path / "persona.jsonl", records)
    cfg = FinetuneConfig(data=str(tmp_path / "persona.jsonl"), output=str(tmp_path / "out"), model=None,
                         method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_layers=list(range(22, 30)),
                         max_steps=10, batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=5,
                         save_every=0, val_fraction=0.15, max_len=96, progress=False, seed=0)
    result = finetune(cfg, log=lambda _: None)
    first, last = result.evals[0]["eval_loss"], result.evals[-1]["eval_loss"]
    assert last < 0.5 * first, result.evals

    llm = pocketllama.load(None, quantize=False)
    llm.prompt_cache = False  # the adapter changes the model: no KV reuse across the two halves

    def answers() -> list[str]:
        return [llm.chat([{"role": "user", "content": q}], max_tokens=8, temperature=0)["content"] for q in HELD_OUT]

    before = answers()
    assert not any(a.startswith("Ahoy") for a in before), before
    load_adapter(llm.model, tmp_path / "out")
    llm.model.eval()
    after = answers()
    print(f"eval loss {first:.3f} -> {last:.3f}; before {before}; after {after}")
    assert all(a.startswith(PERSONA) for a in after), after
