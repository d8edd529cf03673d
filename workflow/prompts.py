"""The instruction format shared by SFT training data and the lm-eval topic tasks.

Both sides import from here so that the SFT model is evaluated on exactly the prompt it was
taught; labels stay in English for every language (the cross-lingual transfer under test).
"""

from __future__ import annotations

# Top folder of a LibreOffice help page -> English topic label.
TOPIC_LABELS: dict[str, str] = {
    "scalc": "spreadsheet",
    "swriter": "text document",
    "simpress": "presentation",
    "sdraw": "drawing",
    "smath": "formula",
    "schart": "chart",
    "sbasic": "macro",
    "sdatabase": "database",
    "shared": "general",
}
TOPICS: list[str] = list(TOPIC_LABELS)
LABELS: list[str] = [TOPIC_LABELS[topic] for topic in TOPICS]


def topic_prompt(text: str) -> str:
    """The prompt; the answer is ``" " + label`` (lm-eval's default target delimiter)."""
    return f"Paragraph: {text.strip()}\nTopic:"


def topic_answer(topic: str) -> str:
    return " " + TOPIC_LABELS[topic]
