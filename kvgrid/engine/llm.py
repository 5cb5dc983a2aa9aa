"""LLM: the offline Python API, in the shape users know from vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kvgrid.engine.config import EngineConfig
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.outputs import RequestOutput
from kvgrid.engine.sampling_params import RequestError, SamplingParams

Prompt = str | list[int]
Messages = list[dict]


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.engine.warm_thread()  # the thread that builds an LLM is the one that generates
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt; results come back in the order of `prompts`."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise RequestError("give one SamplingParams, or one per prompt")
        order = []
        for prompt, p in zip(prompts, params):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer, so no chat template")
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [
            tok.encode(
                tok.apply_chat_template(list(m), add_generation_prompt=add_generation_prompt),
                add_special_tokens=False,
            )
            for m in messages
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="generating", unit="req")
        try:
            while len(final) < len(order):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in order:
                if rid not in final:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[rid] for rid in order]
