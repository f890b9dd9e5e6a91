"""`pocketllama chat`: an interactive multi-turn REPL with streamed answers, or one answer to a question.

    pocketllama chat -m MODEL                      # REPL: /reset, /system TEXT, /exit
    pocketllama chat -m MODEL "What is 2+2?"       # prints only the answer
    echo "What is 2+2?" | pocketllama chat         # question from stdin
    pocketllama chat -m VISION_MODEL --image photo.jpg "Describe this image"   # Llama 3.2 Vision
    pocketllama chat -m MODEL --adapter out/ "Hi"  # with a LoRA adapter from `pocketllama finetune`
    pocketllama chat -m MODEL --draft-model self-int4          # speculative decoding: same answers, sooner
    pocketllama chat -m MODEL --prompt-cache system.kv         # system prompt prefilled by `cache-prompt --system`

Each turn reuses the KV cache of the conversation so far: only the new message is prefilled.
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_model_args,
    add_sampling_args,
    add_speculation_args,
    cli_errors,
    load_from_args,
    sampling_kwargs,
)
from .generate import stats_line

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), "
        "/image PATH (attach an image to the next question; vision models), /exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllama chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("question", nargs="*", help="ask one question, print the answer and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--date", default=None, help="date for the Llama 3.2 system block, e.g. '26 Jul 2024'")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="attach an image to the (first) question; needs a Llama 3.2 Vision model")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter (PEFT folder, e.g. from `pocketllama finetune`) without merging")
    add_sampling_args(p)
    add_speculation_args(p)
    p.add_argument("--stats", action="store_true", help="one-shot: print token counts and tokens/s to stderr")
    return p


class ChatSession:
    """A conversation: messages so far plus the system prompt; `ask` streams one answer."""

    def __init__(self, llm, system: str | None, date: str | None, sampling: dict, compile: bool) -> None:
        self.llm, self.system, self.date, self.sampling, self.compile = llm, system, date, sampling, compile
        self.history: list[dict] = []
        self.image: str | None = None  # attached to the next question, then kept in the history


    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, question: str, out) -> object:
        content = question
        if self.image is not None:
            content = [{"type": "image", "image": self.image}, {"type": "text", "text": question}]
            self.image = None
        self.history.append({"role": "user", "content": content})
        parts, last = [], None
        for last in self.llm.stream_chat(self.messages(), date_string=self.date, compile=self.compile,
                                         **self.sampling):
            parts.append(last.text)
            out.write(last.text)
            out.flush()
        self.history.append({"role": "assistant", "content": "".join(parts)})
        return last


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    question = " ".join(args.question).strip()
    if not question and not sys.stdin.isatty():
        question = sys.stdin.read().strip()
        if not question:
            raise ValueError("empty question on stdin")
    if args.image is not None:  # a bad image fails before the model loads
        from ..image_processing import load_image

        load_image(args.image)
    llm = load_from_args(args)
    if args.adapter is not None:
        from ..finetune.peft_format import load_adapter

        load_adapter(llm.model, args.adapter, dropout=0.0)
        llm.model.eval()
    if args.prompt_cache:
        meta = llm.load_prompt_cache(args.prompt_cache).metadata
        if meta.get("kind") != "system":
            raise ValueError(f"prompt cache {args.prompt_cache} holds a plain-text prefix; for chat, make one from "
                             "the system prompt with `pocketllama cache-prompt --system`")
        args.system = args.system if args.system is not None else meta.get("system")
        args.date = args.date if args.date is not None else meta.get("date")
    session = ChatSession(llm, args.system, args.date, sampling_kwargs(args), args.compile)
    session.image = args.image
    if question:
        last = session.ask(question, sys.stdout)
        sys.stdout.write("\n")
        if args.stats and last is not None:
            print(stats_line(last), file=sys.stderr)
        return 0
    return repl(session)


def repl(session: ChatSession) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"pocketllama chat with {session.llm.source.name} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return 0
        if line == "/reset":
            session.history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            session.system = line[len("/system"):].strip() or None
            session.history.clear()
            print(f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)",
                  file=sys.stderr)
            continue
        if line.startswith("/image"):
            from ..image_processing import load_image

            path = line[len("/image"):].strip()
            try:
                load_image(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            session.image = path
            print(f"(image {path} attached to the next question)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}", file=sys.stderr)
            continue
        try:
            last = session.ask(line, sys.stdout)
        except KeyboardInterrupt:  # stop this answer, keep the session
            session.history.pop()
            print("\n(interrupted)", file=sys.stderr)
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the REPL
            session.history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if last is not None:
            print(stats_line(last), file=sys.stderr)
