"""Tokenizer and streaming detokenizer: equal to transformers, safe on partial characters."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, processors

from kvgrid.models.config import ModelError
from kvgrid.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "Numbers: 1234567 and 3.14159, dates 2024-05-01.",
    "Emoji 😀👍🏽 and family 👨‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어도.",
    "Tabs\tand\nnew\n\nlines\r\n",
    "Special tokens inline: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "Ünïcödé àccents, ß, ø, and ﬁ ligature",
    "",
]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf_tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_basic_facts(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1  # <|im_start|>, as the HF release names it
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.token_id("<|im_end|>") == 2
    # the smollm pre-tokenizer splits digits one by one
    assert len(tok.encode("1234567", add_special_tokens=False)) == 7


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(tok, hf_tok, add_special_tokens):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == hf_tok.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_add_special_tokens_follows_the_post_processor(default_model_dir, tmp_path):
    """A tokenizer whose post-processor adds bos/eos (Llama-3 style) does so only when asked,
    exactly as transformers does."""
    from transformers import AutoTokenizer

    d = tmp_path / "bos"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, d / f)
    backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>",
        special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)],
    )
    backend.save(str(d / "tokenizer.json"))
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add) == hf.encode(text, add_special_tokens=add)
    assert ours.encode("hi")[0] == 1 and ours.encode("hi")[-1] == 0
    assert ours.encode("hi", add_special_tokens=False) == hf.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(tok, hf_tok, skip):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )
    assert tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文? 😀"},
    ],
    [{"role": "user", "content": "Hi"}],  # the template adds its default system turn
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_equals_transformers(tok, hf_tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.endswith("<|im_start|>assistant\n") == gen


# A template that uses what transformers puts in a template's environment.
FANCY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% generation %}A: {{ m['content'] }}\n{% endgeneration %}"
    "{% else %}  {{ m['role'] }}: {{ m['content'] | tojson }}\n{% endif %}"
    "{% endfor %}"
    "{% if tools %}tools={{ tools | tojson(indent=2) }}\n{% endif %}"
    "year={{ strftime_now('%Y') }}{{ eos_token }}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_template_environment_matches_transformers(default_model_dir, tmp_path):
    from transformers import AutoTokenizer

    d = shutil.copytree(default_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.st*"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = FANCY_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    msgs = [
        {"role": "system", "content": "skipped"},
        {"role": "user", "content": 'say "<b>ü</b>"'},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    got = ours.apply_chat_template(msgs, tools=tools)  # add_generation_prompt defaults on
    assert got == hf.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert got.endswith("assistant:") and "A: ok\n" in got
    assert '"say \\"<b>ü</b>\\""' in got  # tojson: no HTML escaping, no ASCII escaping
    with pytest.raises(ValueError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] needs a 'role'"),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) needs a 'content'"),
        ([{"role": "user", "content": 3}], r"must be a string or a list of parts"),
    ],
)
def test_bad_messages_are_rejected(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(messages)


def test_no_template_names_the_model(default_model_dir, tmp_path):
    d = tmp_path / "plain-model"
    d.mkdir()
    shutil.copy(default_model_dir / "tokenizer.json", d / "tokenizer.json")
    t = Tokenizer.from_dir(d)
    assert not t.has_chat_template() and t.eos_token_ids == frozenset()
    with pytest.raises(ValueError, match="'plain-model' has no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ModelError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


# ---- streaming ------------------------------------------------------------------------


def stream(tok, ids, prompt=(), skip=True, chunk=1):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_never_splits_a_character(tok, chunk):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            deltas = stream(tok, ids, skip=skip, chunk=chunk)
            assert not any("\ufffd" in d for d in deltas), text
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_emoji_spans_several_tokens_and_arrives_whole(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level pieces of one character
    deltas = stream(tok, ids)
    assert [d for d in deltas if d] == ["😀"]


def test_stream_with_prompt_context(tok):
    prompt = tok.encode("The weather in 東京 is", add_special_tokens=False)
    out = tok.encode(" sunny ☀️ today, 25°C.", add_special_tokens=False)
    assert "".join(stream(tok, out, prompt=prompt)) == tok.decode(out)
    # a prompt cut inside a character does not lend its bytes to the output
    cut = tok.encode("東", add_special_tokens=False)
    assert len(cut) > 1
    assert "".join(stream(tok, out, prompt=cut[:-1])) == tok.decode(out)


def test_stream_of_random_tokens_equals_full_decode(tok):
    rng = random.Random(0)
    # byte-level pieces of multibyte characters are the ids that decode to U+FFFD alone
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 50
    for _ in range(20):
        pick = lambda: rng.choice(partial) if rng.random() < 0.5 else rng.randrange(49152)
        ids = [pick() for _ in range(40)]
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        # text is released as it becomes final: the end releases at most the held-back tail
        assert len(deltas[-1]) <= len(tok.decode(ids[-32:]))


def byte_fallback_tokenizer() -> Tokenizer:
    """A sentencepiece-style BPE (▁ for spaces, <0xNN> byte fallback, leading-space strip
    on decode), the kind Llama-2/Mistral ship: a different decoder path than byte-level."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "!"]:
        vocab[piece] = len(vocab)
    # no merges: pieces are only single characters, so words spell out and everything
    # outside them (CJK, emoji) goes through <0xNN> byte tokens
    bpe = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, "byte-fallback", {"bos_token": "<s>", "eos_token": "</s>"})


def test_stream_with_byte_fallback_tokens():
    tok = byte_fallback_tokenizer()
    text = "hello world 世界 😀 hello!"
    ids = tok.encode(text, add_special_tokens=False)
    byte_ids = [i for i in ids if 3 <= i < 259]
    assert len(byte_ids) >= 10  # CJK and emoji went through byte fallback
    assert tok.decode(ids) == text
    for chunk in (1, 2):
        deltas = stream(tok, ids, chunk=chunk)
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == text
    # alone, the decoder strips the first token's space; after a prompt that space is what
    # joins the continuation to it, so the stream keeps it
    prompt = tok.encode("hello", add_special_tokens=False)
    cont = tok.encode("world 😀", add_special_tokens=False)  # ▁ w o r l d ▁ <0xF0> ...
    assert tok.decode(cont) == "world 😀"
    assert "".join(stream(tok, cont, prompt=prompt)) == " world 😀"


def test_flush_releases_an_incomplete_character_at_the_end(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push([i]) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")
