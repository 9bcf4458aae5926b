"""nmoe.serve: the DeepSeek-V3 serving engine (offline API, server, torchrun modules)."""

from nmoe.serve.request import OutputMode, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "OutputMode"]


def __getattr__(name):
    # LLM pulls in the engine and torch; import it on first use so `import nmoe.serve` stays light.
    if name == "LLM":
        from nmoe.serve.llm import LLM

        return LLM
    raise AttributeError(name)
