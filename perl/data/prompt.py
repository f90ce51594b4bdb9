"""The Countdown prompt, built one way for every model.

PeRL's prompt is a system message, a user instruction and an assistant prefix that opens the
reasoning block. A tokenizer with a chat template gets the three as chat messages; a tokenizer
without one (the embedded ``countdown-nano``) gets a compact plain template, because every prompt
token costs time on a CPU and a model trained from scratch has no use for the prose.
The choice is made from the tokenizer, never from a model name.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_MESSAGE = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)
USER_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final equation in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"

# note: the plain template keeps the assistant prefix verbatim so that rewards (which re-attach
# "<think>") and the trained completions see the same text under both templates.
PLAIN_TEMPLATE = "numbers: {numbers_plain} target: {target}\n" + ASSISTANT_PREFIX


def uses_chat_template(tokenizer) -> bool:
    """True when ``tokenizer`` carries a chat template (then PeRL's chat prompt is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(nums: Sequence[int], target: int, tokenizer=None) -> str:
    """Return the prompt text for one Countdown problem.

    Args:
        nums (`Sequence[int]`): the numbers to use, each exactly once.
        target (`int`): the value the equation must reach.
        tokenizer (optional): decides the template; ``None`` or no chat template gives the plain one.
    """
    nums = [int(n) for n in nums]
    if tokenizer is not None and uses_chat_template(tokenizer):
        messages = [
            {"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": USER_TEMPLATE.format(numbers=nums, target=int(target))},
            {"role": "assistant", "content": ASSISTANT_PREFIX},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return PLAIN_TEMPLATE.format(numbers_plain=" ".join(str(n) for n in nums), target=int(target))
