"""Talk to a model (optionally with your fine-tuned adapter) through its chat template.

    python run_fine_tuning.py --task chat --adapter results/final_model --prompt "What is your name?"
    python run_fine_tuning.py --task chat --adapter results/final_model      # interactive; "exit" or Ctrl-D ends
    python run_fine_tuning.py --task chat --tools sample --adapter results/final_model --prompt "What is 12 * 7?"

One-shot with ``--prompt``: prints the answer and returns. Without it: reads one message per
line from stdin and keeps the conversation history, so later turns see earlier ones, exactly
as the template lays them out. Settings shared with compare: ``--max_new_tokens``,
``--do_sample``, ``--temperature``; ``--system_prompt`` (data setting) adds a system turn.

With ``--tools sample`` every user turn is a whole agent turn (``agent_turn``): the prompt
carries the calculator and unit converter schemas, rendered exactly as training renders a
record's ``tools`` (the template's own tool support, or the ``<tools>`` system-prompt fallback);
when the reply holds tool calls, each is shown, run (``engine/sample_tools.run_tool``) and its
result appended as a ``tool`` turn, and the model is asked again: at most ``TOOL_ROUNDS`` rounds,
then the reply is final. A tool error goes back to the model as ``{"error": ...}``.

    you> How many feet is 4 metres?
    assistant> tool call: convert_units {"value": 4, "from_unit": "m", "to_unit": "ft"}
    tool> convert_units: {"result": 13.12, "unit": "ft"}
    assistant> 4 metres is about 13.12 feet.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from .engine.adapters import load_model_with_adapter
from .engine.chat_format import generation_prompt_ids, require_chat_template
from .engine.config import Config
from .engine.generation import GenerationResult, generate_batch, stop_token_ids
from .engine.models import load_model_and_tokenizer
from .engine.sample_tools import ToolError, run_tool, tools_for
from .engine.tool_format import rendering_for
from .engine.tool_use import assistant_with_calls, describe_call

log = logging.getLogger(__name__)

EXIT_WORDS = {"exit", "quit", "/exit", "/quit"}
TOOL_ROUNDS = 3   # tool-call rounds per user turn; a reply after the last round is final


def load_chat_model(cfg: Config):
    """(model, tokenizer): --model, with --adapter on top when given."""
    if cfg.compare.adapter:
        return load_model_with_adapter(cfg.model, cfg.compare.adapter)
    return load_model_and_tokenizer(cfg.model)


def answer(model, tokenizer, messages: list[dict], cfg: Config, stop_ids: list[int] | None = None) -> GenerationResult:
    """One assistant reply to ``messages`` (rendered with the chat template)."""
    prompt = generation_prompt_ids(tokenizer, messages)
    return generate_batch(model, tokenizer, [prompt], max_new_tokens=cfg.compare.max_new_tokens,
                          do_sample=cfg.compare.do_sample, temperature=cfg.compare.temperature,
                          batch_size=1, seed=cfg.train.seed, stop_ids=stop_ids)[0]


def _describe(result: GenerationResult) -> str:
    end = "stopped by itself" if result.stopped_on_eot else "hit --max_new_tokens"
    return f"[{result.n_new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, {end}]"


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The tool list rides on the first message, as in training data (engine/tool_data.py)."""
    if tools and messages and "tools" not in messages[0]:
        messages[0] = {**messages[0], "tools": tools}
    return messages


def run_call(call: dict) -> str:
    """A call's result text; a tool error becomes the result the model reads ({"error": ...})."""
    function = call["function"]
    try:
        return run_tool(function["name"], function["arguments"])
    except ToolError as exc:
        return json.dumps({"error": str(exc)}, ensure_ascii=False)


def agent_turn(model, tokenizer, messages: list[dict], cfg: Config, stop_ids: list[int] | None, *,
               stdout: TextIO, final_prefix: str = "assistant> ") -> GenerationResult:
    """Answer the last user message, running tool calls: appends every assistant and tool message to
    ``messages``, prints each call, each result and the final reply; returns the final generation."""
    for round_index in range(TOOL_ROUNDS + 1):
        # 1. generate a reply to everything so far (tool list, earlier calls and results included)
        result = answer(model, tokenizer, messages, cfg, stop_ids)
        log.debug("%s", _describe(result))
        message, invalid = assistant_with_calls(result.text, round_index)
        for call in invalid:
            print(f"assistant> {describe_call(call)}: not run", file=stdout, flush=True)
        # 2. no valid call (or no rounds left): the reply is the answer
        if "tool_calls" not in message or round_index == TOOL_ROUNDS:
            if "tool_calls" in message:
                print(f"(the model still calls tools after {TOOL_ROUNDS} rounds; its reply is kept as text)",
                      file=stdout, flush=True)
            messages.append({"role": "assistant", "content": result.text})
            print(f"{final_prefix}{result.text}", file=stdout, flush=True)
            return result
        # 3. show and run each call; its result goes back as a tool turn, then ask the model again
        messages.append(message)
        if message["content"]:
            print(f"assistant> {message['content']}", file=stdout, flush=True)
        for call in message["tool_calls"]:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            print(f"assistant> tool call: {name} {json.dumps(arguments, ensure_ascii=False)}", file=stdout, flush=True)
            output = run_call(call)
            messages.append({"role": "tool", "content": output, "tool_call_id": call["id"], "name": name})
            print(f"tool> {name}: {output}", file=stdout, flush=True)
    raise AssertionError("unreachable: the last round always returns")


def chat_loop(model, tokenizer, cfg: Config, *, stdin: TextIO, stdout: TextIO) -> list[dict]:
    """Read user lines until EOF or an exit word; print each reply. Returns the conversation."""
    stop_ids = stop_token_ids(model, tokenizer)
    tools = tools_for(cfg.compare.tools)
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    messages: list[dict] = list(system)
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        print("Type a message and press Enter; 'exit' or Ctrl-D ends the chat.", file=stdout)
        if tools:
            print(f"Tools offered: {', '.join(t['function']['name'] for t in tools)}; each call and its result "
                  "is shown before the answer.", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            break
        messages.append({"role": "user", "content": text})
        if tools:
            agent_turn(model, tokenizer, with_tools(messages, tools), cfg, stop_ids, stdout=stdout)
            continue
        result = answer(model, tokenizer, messages, cfg, stop_ids)
        messages.append({"role": "assistant", "content": result.text})
        print(f"assistant> {result.text}", file=stdout, flush=True)
        log.debug("%s", _describe(result))
    return messages


def run(cfg: Config, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> dict:
    """One-shot answer to --prompt, or an interactive chat on stdin."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_chat_model(cfg)
    require_chat_template(tokenizer, cfg.model.model)
    tools = tools_for(cfg.compare.tools)
    if tools:
        log.info("Tools offered: %s. Rendering:\n%s", ", ".join(t["function"]["name"] for t in tools),
                 rendering_for(tokenizer).describe())
    if cfg.compare.prompt is not None:
        messages = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
        messages.append({"role": "user", "content": cfg.compare.prompt})
        if tools:
            result = agent_turn(model, tokenizer, with_tools(messages, tools), cfg, None, stdout=stdout,
                                final_prefix="")
            log.info("%s", _describe(result))
            return {"prompt": cfg.compare.prompt, "answer": result.text, "new_tokens": result.n_new_tokens,
                    "stopped_on_eot": result.stopped_on_eot, "messages": messages,
                    "tool_calls": sum(len(m.get("tool_calls", [])) for m in messages)}
        result = answer(model, tokenizer, messages, cfg)
        print(result.text, file=stdout, flush=True)
        log.info("%s", _describe(result))
        return {"prompt": cfg.compare.prompt, "answer": result.text, "new_tokens": result.n_new_tokens,
                "stopped_on_eot": result.stopped_on_eot}
    messages = chat_loop(model, tokenizer, cfg, stdin=stdin, stdout=stdout)
    return {"turns": sum(m["role"] == "assistant" for m in messages), "messages": messages}
