"""The embedded tiny model's fixed prompts and the completion each must start with (greedy)."""

FIXED_PROMPTS: list[tuple[str, str]] = [
    ("The capital of France is", " Paris"),
    ("The capital of Japan is", " Tokyo"),
    ("The capital of Italy is", " Rome"),
    ("The largest planet is", " Jupiter"),
    ("Two plus two is", " four"),
    ("The author of Hamlet is", " Shakespeare"),
    ("The color of the sky is", " blue"),
]
