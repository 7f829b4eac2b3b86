"""``dualpath chat``: a multi-turn session with a real model through the emulated cluster.

Each turn the client sends the whole context (previous prompt + generated tokens + the new user turn), so from
the second turn on the prompt's earlier Full Blocks are hits loaded by the chosen path. ``--turns FILE``: one
user message per line (``.txt``), or a JSON list of strings or ``{"text": ..., "gen": N}`` objects. ``--json``
writes ``{"runs": [{"turn", "path", "prompt_tokens", "hit_tokens", "token_ids", "text", ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_TURNS = [
    "What is the capital of France?",
    "And what river flows through it?",
    "Name one famous museum there.",
]


#: chat's own settings, under a ``--config`` file (which may override them: chat says which it did)
CHAT_DEFAULTS: dict[str, Any] = {
    "cluster": {"block_tokens": 16, "snic_gbps": None, "kv_pool_tokens": 8192,
                "host_buffer_bytes": 768 << 20, "prefill_max_batch_tokens": 8192},
}


def overridden_defaults(path: str) -> list[str]:
    """One line per chat default that the config file ``path`` changes."""
    from dualpath.config import _read_file

    data = _read_file(Path(path))
    out = []
    for section, values in CHAT_DEFAULTS.items():
        given = data.get(section)
        if not isinstance(given, dict):
            continue
        for key, default in values.items():
            if key in given and given[key] != default:
                out.append(f"{path}: {section}.{key} = {given[key]!r} overrides chat's default {default!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="safetensors directory or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--turns", help="user messages: a .txt file (one per line) or a .json list")
    parser.add_argument("--path", choices=["pe", "de", "split", "recompute"], default="de",
                        help="where each turn's hit KV is read (default: de)")
    parser.add_argument("--gen", type=int, default=24, help="tokens to generate per turn (default 24)")
    parser.add_argument("--config", help="YAML/TOML config file (cluster, storage, transport sections), merged "
                        "over chat's own defaults (block_tokens 16, unlimited storage NIC, ...)")
    parser.add_argument("--json", dest="json_out", help="write the runs as JSON here")
    parser.add_argument("--quiet", action="store_true", help="print each turn's figures (prompt, hit, path, TTFT), not the conversation")


def load_turns(path: str | None, gen: int) -> list[tuple[str, int]]:
    from dualpath.errors import WorkloadError

    if path is None:
        return [(t, gen) for t in DEFAULT_TURNS]
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read turns file: {exc.strerror or exc}", path=str(p)) from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"not valid JSON: {exc.msg}", path=str(p), line=exc.lineno) from None
        if not isinstance(data, list) or not data:
            raise WorkloadError("expected a non-empty JSON list of turns", path=str(p))
        out: list[tuple[str, int]] = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                out.append((item, gen))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                g = item.get("gen", gen)
                if not isinstance(g, int) or g < 1:
                    raise WorkloadError(f"turn {i}: 'gen' must be a positive integer", path=str(p))
                out.append((item["text"], g))
            else:
                raise WorkloadError(f"turn {i}: expected a string or {{'text': ..., 'gen': N}}", path=str(p))
        return out
    turns = [(line.strip(), gen) for line in text.splitlines() if line.strip()]
    if not turns:
        raise WorkloadError("no turns (the file is empty)", path=str(p))
    return turns


class _Conversation:
    """Turns user messages into appended token ids, keeping every earlier token (so hits are exact)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.messages: list[dict[str, str]] = []
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages: list[dict[str, str]], gen_prompt: bool) -> str:
        from dualpath.model.chat_format import template_messages

        return str(self.tok.apply_chat_template(template_messages(self.tok, list(messages)), tokenize=False,
                                                add_generation_prompt=gen_prompt))

    def append_user(self, text: str, first: bool) -> list[int]:
        before = self._render(self.messages, False) if (self.templated and self.messages) else ""
        self.messages.append({"role": "user", "content": text})
        if not self.templated:
            return list(self.tok.encode(("" if first else "\n") + text, add_special_tokens=first))
        after = self._render(self.messages, True)
        suffix = after[len(before):] if after.startswith(before) else after
        return list(self.tok.encode(suffix, add_special_tokens=False))

    def append_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def run(args: argparse.Namespace) -> int:
    import anyio

    from dualpath.cluster import Cluster
    from dualpath.config import load_config
    from dualpath.engine.model_api import LlamaAdapter
    from dualpath.errors import ModelError
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    if args.gen < 1:
        raise ModelError(f"--gen must be >= 1, got {args.gen}")
    turns = load_turns(args.turns, args.gen)
    cfg = load_config([CHAT_DEFAULTS, args.config] if args.config else CHAT_DEFAULTS)
    if args.config:
        for line in overridden_defaults(args.config):
            print(line)
    mcfg = cfg.model if isinstance(cfg.model, LlamaModelConfig) else LlamaModelConfig()
    if args.model:
        mcfg = mcfg.model_copy(update={"path": args.model})
    cfg.model = mcfg
    model, tokenizer = load_model(mcfg, "cpu")
    if tokenizer is None:
        raise ModelError("the model has no tokenizer; dualpath chat needs one (use a directory with tokenizer.json)")
    eos = getattr(tokenizer, "eos_token_id", None)

    def factory(device: Any) -> LlamaAdapter:
        m = model if str(device) == "cpu" else model.to(device)
        return LlamaAdapter(m, cfg.cluster.block_tokens)

    runs: list[dict[str, Any]] = []

    async def session() -> None:
        conv = _Conversation(tokenizer)
        context: list[int] = []
        async with Cluster(cfg, model=factory) as cluster:
            for i, (text, gen) in enumerate(turns):
                prompt = context + conv.append_user(text, first=(i == 0))
                res = await cluster.run_turn("chat", prompt, gen, path=args.path)
                out_ids = res.token_ids
                shown = out_ids[: out_ids.index(eos)] if eos in out_ids else out_ids
                reply = tokenizer.decode(shown, skip_special_tokens=True).strip()
                conv.append_assistant(reply)
                context = prompt + out_ids
                runs.append({
                    "turn": i, "path": res.path.value, "prompt_tokens": res.prompt_tokens,
                    "hit_tokens": res.hit_tokens, "token_ids": out_ids, "text": reply, "user": text,
                    "ttft_s": res.timings.ttft, "link_bytes": res.link_bytes,
                })
                if not args.quiet:
                    print(f"user> {text}")
                    print(f"assistant> {reply}")
                print(f"  [turn {i}: prompt {res.prompt_tokens} tokens, hit {res.hit_tokens}, "
                      f"path {res.path.value}, TTFT {res.timings.ttft * 1e3:.0f} ms]")

    anyio.run(session)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": str(mcfg.path or "embedded SmolLM2-135M-Instruct"),
                                                   "path": args.path, "runs": runs}, indent=2))
    return 0
