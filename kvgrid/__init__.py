"""kvgrid: LLM inference that treats the KV cache as persistent, tiered, secured data."""

from kvgrid.engine.sampling_params import RequestError, SamplingParams

__all__ = ["LLM", "RequestError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code; keep `import kvgrid` light for the CLI and router
    if name == "LLM":
        from kvgrid.engine.llm import LLM

        return LLM
    raise AttributeError(name)
