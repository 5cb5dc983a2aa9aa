"""`kvgrid generate` and `kvgrid chat`: the engine on the command line, no server (or, for
`chat --url`, a running server through its OpenAI API)."""

from __future__ import annotations

import argparse
import sys

from kvgrid import envs
from kvgrid.chat_client import print_usage, questions
from kvgrid.engine.args import add_engine_args, engine_config_from_args
from kvgrid.engine.sampling_params import RequestError, SamplingParams


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        stop=args.stop,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with the engine")
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    add_engine_args(p)
    _add_sampling_args(p, 64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="chat with the model (one question, or interactive): with its own engine in this "
        "process, or with a running server (--url)",
        description="Without --url, chat loads the model into an engine of its own in this "
        "process (the engine flags below apply). With --url, it talks to a running server "
        "(`kvgrid serve`, or any OpenAI-compatible one) through /v1/chat/completions; "
        "--model then names the served model (default: the server's first).",
    )
    p.add_argument("message", nargs="?", help="ask one question and exit")
    p.add_argument("--system", default=None, help="system prompt")
    g = p.add_argument_group("server (instead of a local engine)")
    g.add_argument("--url", default=None, help="the server, e.g. http://127.0.0.1:8000")
    g.add_argument(
        "--api-key",
        default=None,
        help="API key for a server started with --api-keys (default: $KVGRID_API_KEY)",
    )
    add_engine_args(p)
    _add_sampling_args(p, 256)
    p.set_defaults(func=cmd_chat, engine_defaults=_engine_defaults())


def _engine_defaults() -> dict:
    """The engine flags' defaults (a flag changed from its default has no effect with --url)."""
    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    return {a.dest: a.default for a in p._actions if a.option_strings}


def _chat_with_server(args: argparse.Namespace) -> int:
    from kvgrid.chat_client import ChatError, RemoteChat, chat

    engine_flags = [
        "--" + k.replace("_", "-")
        for k, v in args.engine_defaults.items()
        if k != "model" and getattr(args, k, v) != v
    ]
    if engine_flags:
        print(
            f"error: {', '.join(engine_flags)} configure a local engine; with --url the "
            "server's engine answers",
            file=sys.stderr,
        )
        return 2
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.sampling_seed,
        "stop": args.stop,
    }
    remote = RemoteChat(args.url, args.api_key or envs.KVGRID_API_KEY.get(), args.model)
    try:
        return chat(remote, args.message, args.system, sampling)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        remote.close()


def _engine(args):
    from kvgrid.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config_from_args(args))


def _stream(engine, request_id: str, prompt, params: SamplingParams):
    """Print text as it is generated; return the final output."""
    engine.add_request(request_id, prompt, params)
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id == request_id:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                if out.finished:
                    final = out
    sys.stdout.write("\n")
    return final


def cmd_generate(args: argparse.Namespace) -> int:
    engine = None
    try:
        params = _params(args)
        engine = _engine(args)
        for i, prompt in enumerate(args.prompt):
            engine.add_request(f"gen-{i}", prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        for i in range(len(args.prompt)):
            out = done[f"gen-{i}"]
            c = out.outputs[0]
            print(f"{args.prompt[i]}{c.text}")
            print(
                f"[{len(c.token_ids)} tokens, finish={c.finish_reason}, "
                f"prompt={len(out.prompt_token_ids)} tokens, cached={out.num_cached_tokens}]",
                file=sys.stderr,
            )
    except (RequestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.close()  # queued store writes land, so the next run finds them
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        return _chat_with_server(args)
    engine = None
    try:
        params = _params(args)
        engine = _engine(args)
        tok = engine.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer, so no chat template")
        history = [{"role": "system", "content": args.system}] if args.system else []
        for turn, question in enumerate(questions(args.message)):
            history.append({"role": "user", "content": question})
            prompt = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
            out = _stream(engine, f"chat-{turn}", prompt, params)
            history.append({"role": "assistant", "content": out.outputs[0].text})
            print_usage(
                len(out.outputs[0].token_ids), out.num_cached_tokens, len(out.prompt_token_ids)
            )
        return 0
    except (RequestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.close()  # queued store writes land, so the next run finds them
