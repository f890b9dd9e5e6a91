"""Speculative decoding and prompt caching: decode tokens/s with and without speculation, acceptance rate, and
time to first token for a 2,000-token system prompt, cold vs cached. Each model in a fresh process that runs
its modes interleaved (plain, drafted, ...) `--reps` times; a speed-up is the median of each rep's ratio to the
plain run just before it, so a load swing on a shared machine hits both sides of a ratio alike.

Rows (greedy, so every speculative run must print the same tokens as plain decoding; `same` checks it):
- 1b-bf16: Llama-3.2-1B-shaped random bf16 checkpoint, 128-token prompt, 64 new tokens: plain, self-int4
  draft, and a draft that never agrees (self-int4 shifted by one id: the fallback must hold the loss <= 5%).
  The draft and target K/V caches, the draft's catch-up (a self-draft copies the target's K/V instead of
  prefilling the prompt) and the pauses all count in the tok/s.
  Random weights give near-flat distributions that int4 noise reorders (acceptance ~0), so `oracle-A` rows
  pay the real int4 draft's cost but propose plain decoding's next token with probability A: the speed-up
  this machine gets at acceptance A, the number a real checkpoint's acceptance maps onto.
- smollm2: SmolLM2-135M-Instruct (GGUF Q4_1, loaded as float32: both rows measure the same dense model)
  summarising an article, prompt lookup vs plain.
- smollm2-bf16: the same task with a real model's int4 self-draft (bf16 target; random 1B weights make
  near-flat distributions that int4 noise reorders, so only a real model shows int4 acceptance).
- ttft: a 2,000-token system prompt, cold prefill vs a `cache-prompt` file vs the in-memory session.

    python bench/speculative.py [--rows 1b,smollm2,ttft] [--threads 2] [--new 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSS_HELPERS, random_checkpoint, run_json, save, table  # noqa: E402

ARTICLE = (
    "The city council of Riverton voted on Tuesday to approve a new public transit plan that will add three bus "
    "lines and extend the light rail to the northern suburbs by 2027. The plan, which costs 240 million dollars, "
    "will be funded by a mix of federal grants, a half-cent sales tax approved by voters last year, and fares. "
    "Council member Dana Ortiz, who led the transit committee, said the new lines would cut average commute "
    "times by twelve minutes for residents of the northern suburbs. Critics, including the local business "
    "association, argued that the sales tax would hurt small shops and that ridership forecasts were too "
    "optimistic. The light rail extension will add four stations: Maple Street, Northgate, Cedar Park and the "
    "regional hospital. Construction is expected to begin next spring and will close two lanes of Northgate "
    "Avenue for about eighteen months. The transit agency said it would hire 150 new drivers and mechanics. "
    "The council also approved a pilot program of free fares for students and seniors during off-peak hours, "
    "which will run for one year before the council reviews ridership data and decides whether to keep it."
)

WORKLOAD = '''
import torch
torch.set_num_threads(int(sys.argv[3]))
import hashlib, statistics
import pocketllama
from pocketllama.engine.generate import generate
from pocketllama.engine.sampling import SamplingParams
from pocketllama.engine.drafters import make_drafter
modes = sys.argv[2].split(",")
llm = pocketllama.load(sys.argv[1], dtype=DTYPE, quantize=False if KIND == "smollm2" else None)
llm.prompt_cache = False
if KIND == "1b":
    text = "The history of the city begins with a small settlement on the river. " * 40
    ids = llm.tokenizer.encode(text)[:128]
else:
    ids = llm.apply_chat_template([{"role": "user", "content": "Summarize this article in a few sentences, "
                                    "keeping its key facts and names:\\n\\n" + ARTICLE}])
class Shifted:  # a draft that pays the int4 model's cost and is always wrong
    name, catchup = "bad-draft", 0
    def __init__(self, inner):
        self.inner = inner
    def start(self, *a):
        self.inner.start(*a)
    def settle(self, n):
        self.inner.settle(n)
    @property
    def shares_kv(self):  # a self-draft takes the target's K/V (as self-int4 itself does), not a prefill
        return getattr(self.inner, "shares_kv", False)
    def adopt(self, cache, seq):
        return self.inner.adopt(cache, seq)
    def propose(self, seq, k, dist, generated, g):
        out, q = self.inner.propose(seq, k, dist, generated, g)
        self.catchup = self.inner.catchup
        out = [(t + 1) % llm.config.vocab_size for t in out]
        if out:
            generated[0, g:g + len(out)] = torch.tensor(out)
        return out, None
class Oracle(Shifted):  # pays the int4 draft's real cost; proposes plain decoding's next ids with prob. RATE
    name = "oracle"
    def __init__(self, inner, rate):
        super().__init__(inner)
        self.rate, self.rng, self.truth = rate, random.Random(0), []
    def propose(self, seq, k, dist, generated, g):
        out, q = self.inner.propose(seq, k, dist, generated, g)
        self.catchup = self.inner.catchup
        n = len(seq) - len(ids)  # generated ids so far
        out = [t if self.rng.random() < self.rate else (t + 1) % llm.config.vocab_size
               for t in self.truth[n:n + len(out)]]
        if out:
            generated[0, g:g + len(out)] = torch.tensor(out)
        return out, None
import random
drafters = {"plain": None}
for mode in modes:
    if mode == "bad-draft":
        drafters[mode] = Shifted(drafters.get("self-int4") or make_drafter("self-int4", llm))
    elif mode.startswith("oracle-"):
        drafters[mode] = Oracle(drafters.get("self-int4") or make_drafter("self-int4", llm), float(mode[7:]))
    elif mode != "plain":
        drafters[mode] = make_drafter(mode, llm)
params = SamplingParams(max_tokens=NEW, ignore_eos=KIND == "1b")
runs = {m: [] for m in modes}
with torch.inference_mode():
    for m in modes:  # warm-up, each drafter's first use included
        kw = {"drafter": drafters[m]} if drafters[m] is not None else {}
        generate(llm.model, llm.tokenizer, ids[:24], params.replace(max_tokens=8), **kw)
    for rep in range(REPS):  # interleaved, so a load swing hits every mode alike
        for m in modes:
            kw = {"drafter": drafters[m]} if drafters[m] is not None else {}
            runs[m].append(generate(llm.model, llm.tokenizer, ids, params, **kw))
            if m == "plain":
                for d in drafters.values():
                    if isinstance(d, Oracle):
                        d.truth = runs[m][-1].tokens
out = {}
for m, rs in runs.items():
    r = rs[-1]
    tps = [x.generation_tps for x in rs]
    out[m] = {"prompt_tokens": len(ids), "tokens": r.generation_tokens, "decode_tps": statistics.median(tps),
              "tps_runs": [round(t, 2) for t in tps], "ttft_s": statistics.median(x.prompt_time for x in rs),
              "acceptance": r.acceptance_rate, "drafted": r.draft_tokens, "accepted": r.accepted_tokens,
              "out": hashlib.sha1(str(r.tokens).encode()).hexdigest()[:10], "text": r.text[:60], "rss_mb": rss_mb()}
print(json.dumps(out))
'''

TTFT = '''
import torch
torch.set_num_threads(int(sys.argv[3]))
import os, tempfile
import pocketllama
from pocketllama.engine.prefix_cache import save_prompt_cache
from pocketllama.engine.sampling import SamplingParams
llm = pocketllama.load(sys.argv[1], quantize=False)
sentences = [f"Rule {i}: when a customer asks about order {1000 + 7 * i}, check the ledger entry {i * 13 % 97} "
             f"and answer politely in at most {3 + i % 5} sentences." for i in range(400)]
ids = llm.tokenizer.encode(" ".join(sentences))[:SYSTEM]
system = llm.tokenizer.decode(ids)
date = "26 Jul 2024"
head = [{"role": "system", "content": system}]
question = [{"role": "user", "content": "What is the rule for order 1070?"}]
def ttft(model_llm):
    first = next(iter(model_llm.stream_chat(head + question, date_string=date, max_tokens=1)))
    return first.prompt_time, first.cached_tokens, first.prompt_tokens
with torch.inference_mode():
    llm.prompt_cache = False
    llm.generate(llm.tokenizer.encode("warm up the kernels " * 8), max_tokens=2)
    cold, _, n_prompt = ttft(llm)
    alone = llm.apply_chat_template(head, add_generation_prompt=False, date_string=date)
    path = os.path.join(tempfile.mkdtemp(), "system.kv")
    t = time.perf_counter()
    save_prompt_cache(path, llm.model, llm.tokenizer, alone)
    build = time.perf_counter() - t
    llm.prompt_cache = True
    t = time.perf_counter()
    llm.load_prompt_cache(path)
    load_s = time.perf_counter() - t
    cached, hit, _ = ttft(llm)
    llm.session.tokens = llm.session.tokens[:len(alone)]  # (forget the question: a new one on the same prompt)
    session, hit2, _ = ttft(llm)
print(json.dumps({"prompt_tokens": n_prompt, "cached_tokens": hit, "ttft_cold_s": cold, "ttft_file_s": cached,
                  "ttft_session_s": session, "file_load_s": load_s, "file_build_s": build,
                  "file_mb": os.path.getsize(path) / 1e6, "speedup_file": cold / cached,
                  "speedup_session": cold / session}))
'''


def smollm2() -> Path:
    from pocketllama.sources import resolve

    return resolve("smollm2-135m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1b,smollm2,smollm2-int4,ttft")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--new", type=int, default=64, help="new tokens per decode run (SmolLM2: twice as many)")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3, help="decode runs per mode, interleaved; the median counts")
    ap.add_argument("--modes-1b", default="plain,self-int4,bad-draft,oracle-0.8,oracle-0.9,oracle-0.95",
                    help="1b-bf16 modes (plain first)")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    load_before = os.getloadavg()
    decode_rows, ttft_rows = [], []
    wanted = args.rows.split(",")
    jobs = []
    if "1b" in wanted:
        jobs.append(("1b-bf16", random_checkpoint(), args.modes_1b.split(","), "1b", args.new, None))
    if "smollm2" in wanted:
        jobs.append(("smollm2", smollm2(), ["plain", "prompt-lookup"], "smollm2", 2 * args.new, None))
    if "smollm2-int4" in wanted:  # a real model's int4 self-draft (bf16 activations: the native int4 kernel)
        jobs.append(("smollm2-bf16", smollm2(), ["plain", "self-int4", "bad-draft"], "smollm2", 2 * args.new,
                     "bfloat16"))
    for name, path, modes, kind, new, dtype in jobs:
        print(f"[{name}] {', '.join(modes)} ...", file=sys.stderr, flush=True)
        consts = f"KIND, NEW, DTYPE, REPS, ARTICLE = {kind!r}, {new}, {dtype!r}, {args.reps}, {ARTICLE!r}\n"
        result = run_json(RSS_HELPERS + consts + WORKLOAD, str(path), ",".join(modes), args.threads)
        ref = result.get("plain", {})
        for mode in modes:
            r = result.get(mode, {"error": result.get("error")})
            row = {"model": name, "draft": mode, **r}
            if mode != "plain" and "decode_tps" in r and "decode_tps" in ref:
                # each rep's ratio to the plain run just before it (seconds apart): the machine's load swings
                # between reps hit both sides of a ratio alike
                ratios = [a / b for a, b in zip(r["tps_runs"], ref["tps_runs"], strict=True)]
                row["speedup"] = statistics.median(ratios)
                row["speedup range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
                row["same"] = r["out"] == ref["out"]
            decode_rows.append(row)
    if "ttft" in wanted:
        for name, path in (("1b-bf16", random_checkpoint()), ("smollm2", smollm2())):
            print(f"[ttft] {name} ...", file=sys.stderr, flush=True)
            r = run_json(RSS_HELPERS + f"SYSTEM = {args.system_tokens}\n" + TTFT, str(path), "-", args.threads)
            ttft_rows.append({"model": name, **r})
    meta = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if decode_rows:
        print(table(decode_rows, ["model", "draft", "decode_tps", "speedup", "speedup range", "acceptance", "drafted",
                                  "accepted",
                                  "tokens", "same", "tps_runs", "ttft_s", "rss_mb", "error"]))
    if ttft_rows:
        print()
        print(table(ttft_rows, ["model", "prompt_tokens", "cached_tokens", "ttft_cold_s", "ttft_file_s",
                                "ttft_session_s", "speedup_file", "speedup_session", "file_load_s", "file_mb",
                                "error"]))
    print(f"\nload average before/after: {load_before[0]:.1f} / {meta['loadavg_after'][0]:.1f} "
          f"(on {os.cpu_count()} cores)")
    print(f"written {save('speculative', decode_rows + ttft_rows, meta)}")


if __name__ == "__main__":
    main()
