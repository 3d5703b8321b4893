"""The chat prompt set the main job asks dense, pruned and Read-ME (report.md, ``chat`` in metrics.json).

48 single-turn prompts in five kinds: simple facts with the answers that count as correct (lower-case
substrings of the answer), code, instructions, stories, and questions in the style of the text domains.
None of them is built from the training text (``data/chat_prompts.py`` writes the self-distillation
prompts from other templates); edit with care: results in docs/RESULTS.md were measured on this set.
"""

from __future__ import annotations

# (prompt, accepted answers: any of them, lower-cased, as a substring of the lower-cased answer)
FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('What is the capital of France?', ('paris',)),
    ('What is the capital of Japan?', ('tokyo',)),
    ('How many days are there in a week?', ('seven', '7')),
    ('What is the largest planet in our solar system?', ('jupiter',)),
    ('Who wrote the play Romeo and Juliet?', ('shakespeare',)),
    ('At what temperature in degrees Celsius does water boil at sea level?', ('100',)),
    ('What is 2 plus 2?', ('4', 'four')),
    ('What is the chemical formula of water?', ('h2o', 'h₂o')),
    ('How many legs does a spider have?', ('eight', '8')),
    ('What color is the sky on a clear day?', ('blue',)),
    ('What planet do we live on?', ('earth',)),
    ('What is the opposite of hot?', ('cold',)),
    ('What language is mainly spoken in Spain?', ('spanish',)),
    ('How many hours are there in a day?', ('24', 'twenty-four', 'twenty four')),
    ('What is the capital of Italy?', ('rome',)),
    ('Which gas do plants absorb from the air for photosynthesis?', ('carbon dioxide', 'co2')),
)
CODE: tuple[str, ...] = (
    'Write a Python function that returns the square of a number.',
    'How do I reverse a list in Python?',
    'What does the len() function do in Python?',
    'Write a Python function that checks whether a number is even.',
    'How do I read a text file line by line in Python?',
    'What is the difference between a list and a tuple in Python?',
    'Write a for loop in Python that prints the numbers from 1 to 5.',
    'What is a dictionary in Python?',
)
INSTRUCTIONS: tuple[str, ...] = (
    'Give me three tips for better sleep.',
    'List three primary colors.',
    'Explain what photosynthesis is in one sentence.',
    'Write a polite email asking a colleague for a meeting tomorrow.',
    'Give me a short recipe for scrambled eggs.',
    'Suggest three names for a pet dog.',
    'Explain why exercise is good for health.',
    'Summarize the benefits of reading books in two sentences.',
)
STORIES: tuple[str, ...] = (
    'Write a short story about a cat who learns to fly.',
    'Tell me a short bedtime story about a brave little mouse.',
    'Write a four-line poem about the sea.',
    'Write a short story about a robot who wants to be a gardener.',
    'Describe a sunset in three sentences.',
    'Write a haiku about autumn leaves.',
)
DOMAIN: tuple[str, ...] = (
    "What does the word 'melancholy' mean?",
    'Who is Hamlet?',
    "Tell me about the story of Noah's ark.",
    'What is a Python decorator?',
    "What does the 'return' statement do in Python?",
    'Who wrote Paradise Lost?',
    'What is a sonnet?',
    "What does the word 'ephemeral' mean?",
    'Explain the first verse of the Book of Genesis.',
    "What is the theme of Shakespeare's Macbeth?",
)


def chat_prompts() -> list[dict]:
    """Every prompt as ``{"id", "kind", "prompt", "answers"}`` (``answers`` empty except for facts)."""
    out = [{"id": f"fact-{i:02d}", "kind": "fact", "prompt": p, "answers": list(a)} for i, (p, a) in enumerate(FACTS)]
    for kind, items in (("code", CODE), ("instruction", INSTRUCTIONS), ("story", STORIES), ("domain", DOMAIN)):
        out += [{"id": f"{kind}-{i:02d}", "kind": kind, "prompt": p, "answers": []} for i, p in enumerate(items)]
    return out


# what the self-distillation prompts must not mention (data.chat_prompts.build_prompts(exclude=...)): the
# subjects of the prompts above and their expected answers, so the evaluation asks about nothing the chat
# data was made from
KEY_WORDS: tuple[str, ...] = (
    "france", "paris", "japan", "tokyo", "jupiter", "romeo", "juliet", "celsius", "boil", "spider", "legs",
    "photosynthesis", "melancholy", "ephemeral", "hamlet", "noah", "decorator", "sonnet", "genesis", "macbeth",
    "paradise", "italy", "rome", "spain", "spanish", "haiku", "sunset", "robot", "gardener", "mouse", "recipe",
    "scrambled", "sleep", "continents", "h2o", "carbon", "dioxide",
)
