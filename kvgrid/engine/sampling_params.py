"""SamplingParams: how one request picks its tokens and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 64  # choices per request
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
GUIDED_KINDS = ("json_schema", "regex", "choice", "grammar")


class RequestError(ValueError):
    """A request the engine refuses; the message names the offending field."""


@dataclass(frozen=True)
class GuidedDecoding:
    """Output constrained to a language: ``kind`` names how ``spec`` is written.

    json_schema: a JSON schema (text); regex: a regular expression; choice: a JSON list of
    strings; grammar: a Lark grammar in llguidance's dialect (``%json`` embeds a schema).
    """

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise RequestError(
                f"guided decoding kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}"
            )
        if not isinstance(self.spec, str) or not self.spec:
            raise RequestError("guided decoding needs a non-empty spec")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the model's context
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the sampled)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # choices; siblings share the prompt's cached blocks
    # OpenAI's penalties on output tokens: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # the CTRL paper's, over prompt and output: positive logits divided, negative multiplied
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    prompt_logprobs: int | None = None  # top logprobs per prompt token (0: only the token's)
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def penalized(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def needs_history(self) -> bool:
        """Whether sampling needs every earlier token on the host (asynchronous scheduling
        then reads the last step's tokens back before this step samples)."""
        return self.guided is not None or self.penalized

    def validate(self) -> None:
        def bad(msg: str) -> RequestError:
            return RequestError(msg)

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or not 0.0 <= self.temperature <= 100:
            raise bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise bad(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens must not exceed max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= 20):
                raise bad(f"{name} must be an integer in [0, 20], got {v!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {v!r}")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        self._check_logit_bias()
        if isinstance(self.guided, dict):  # arrives as JSON from the router
            try:
                self.guided = GuidedDecoding(**self.guided)
            except TypeError as e:
                raise bad(f"guided decoding: {e}") from None
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise bad(f"guided must be a GuidedDecoding, got {type(self.guided).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise bad(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise bad("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise RequestError("logit_bias must map token ids to numbers")
        bias: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            # JSON object keys are strings: "50256": -100
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise RequestError(f"logit_bias keys must be token ids, got {k!r}") from None
            if tid < 0 or not _is_num(v) or not -100.0 <= v <= 100.0:
                raise RequestError(
                    f"logit_bias maps token ids >= 0 to values in [-100, 100]; got {k!r}: {v!r}"
                )
            bias[tid] = float(v)
        self.logit_bias = bias or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
