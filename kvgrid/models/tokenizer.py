"""Tokenizer for serving: the `tokenizers` library plus jinja2 chat templates.

No transformers import at serve time; encode, decode and chat templates give what
transformers' AutoTokenizer gives on the same directory (the tests hold it to that).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvgrid.models.config import ModelError


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant spans for training masks in
    transformers; for rendering it is just its body."""

    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt text
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"messages[{i}] needs a 'role' string")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] (role {m['role']!r}) needs a 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ValueError(
                f"messages[{i}]['content'] must be a string or a list of parts, "
                f"got {type(content).__name__}"
            )


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        name: str = "model",
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        generation_eos: Sequence[int] = (),
    ):
        self._tok = backend
        self.name = name
        cfg = config or {}
        self._special = {
            k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        bos = self._special["bos_token"]
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        eos = self._special["eos_token"]
        eos_ids = set(generation_eos)
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.add(backend.token_to_id(eos))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self._cleanup = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.chat_template = chat_template
        self._bytes: dict[int, bytes] = {}
        self._added = set(backend.get_added_tokens_decoder())
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self._byte_level = "ByteLevel" in kinds

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelError(f"no tokenizer.json in model directory {str(path)!r}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise ModelError(f"cannot read {tok_file}: {e}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        template = None
        jinja_file = path / "chat_template.jinja"  # where transformers >= 4.43 saves it
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: serve the default one
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default")
        gen = _read_json(path / "generation_config.json")
        eos = _ids(gen.get("eos_token_id"))
        return cls(backend, path.name, cfg, template, eos)

    # ---- ids and text ------------------------------------------------------------------

    def backend_json(self) -> str:
        """The tokenizer as HF tokenizers' JSON (what grammar engines read it from)."""
        return self._tok.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, for some tokens)."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._token_bytes(token_id)
        return b

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added:
            return piece.encode("utf-8")
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._cleanup else text

    def _decode_raw(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------

    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def _template(self) -> jinja2.Template:
        return _jinja_env().from_string(self.chat_template or "")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        """The prompt text, as transformers' ``apply_chat_template(tokenize=False)``."""
        if not self.chat_template:
            raise ValueError(f"model {self.name!r} has no chat template")
        _check_messages(messages)
        context = {k: v for k, v in self._special.items() if v is not None}
        context.update(kw)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            # raise_exception() in a template reports bad conversations (e.g. role order)
            raise ValueError(f"chat template of {self.name!r}: {e}") from None


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is written as one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _clean_up_spaces(text: str) -> str:
    # transformers' clean_up_tokenization, applied only where tokenizer_config asks for it
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


# Tokens decoded together with new ones, so that word-boundary rules of the decoder (a
# leading-space strip on the first token, byte fallback) see the neighbours they see in a
# full decode. With the prompt's last tokens as the first context, a completion keeps the
# space that joins it to the prompt.
_CONTEXT_TOKENS = 4
# Held-back tokens are released after this many even if the text still ends in U+FFFD:
# then it holds real invalid bytes (a model emitting stray byte tokens), not a character
# still arriving. Generous, since a chunk of tokens may end inside a character many times.
_MAX_PENDING = 32


class IncrementalDetokenizer:
    """Streams the text of one sequence: each push returns only text that is final.

    Text ending in an incomplete UTF-8 character (decoded as U+FFFD) is held back until the
    tokens that complete it arrive; ``flush()`` releases whatever is held at the end.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        ctx = list(prompt_ids)[-_CONTEXT_TOKENS:]
        # a prompt cut inside a character would lend its dangling bytes to the output
        if ctx and tokenizer._decode_raw(ctx, skip_special_tokens).endswith("\ufffd"):
            ctx = []
        self._ids: list[int] = ctx
        self._prefix = 0  # start of the window decoded on each push
        self._read = len(ctx)  # ids before this are already in the text
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release held-back text (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        window = self._ids[self._prefix :]
        before = self._tok._decode_raw(window[: self._read - self._prefix], self._skip)
        after = self._tok._decode_raw(window, self._skip)
        pending = len(self._ids) - self._read
        if after.endswith("\ufffd") and not final and pending < _MAX_PENDING:
            return ""
        delta = after[len(before) :]
        self._read = len(self._ids)
        self._prefix = max(self._prefix, self._read - _CONTEXT_TOKENS)
        self._text += delta
        return delta
