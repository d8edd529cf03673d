"""The instruction format shared by the demo's SFT data and the lm-eval topic tasks.

The demo builder (workflow/demo_corpus.py) writes the topic instruction dataset with
:func:`topic_example`, the evalset stage writes each held-out paragraph's :func:`topic_prompt`,
and the evaluation's topic task (workflow/tasks/_lrm_topic.yaml, checked by
workflow/evaluate.py) asks that prompt with the same labels, so the SFT model is
evaluated on exactly the prompt it was taught; labels stay in English for every language (the
cross-lingual transfer under test).
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


def topic_example(text: str, topic: str) -> dict[str, str]:
    """One instruction record of the topic task: the prompt and its answer. Trained in the
    plain format (no chat template, no separator), the answer's tokens are those lm-eval
    scores after the prompt."""
    if topic not in TOPIC_LABELS:
        raise ValueError(f"unknown topic {topic!r}; known topics: {sorted(TOPIC_LABELS)}")
    return {"prompt": topic_prompt(text), "response": topic_answer(topic)}


def topic_record(text: str, topic: str) -> dict[str, str | int]:
    """A held-out paragraph as the evaluation's topic task reads it (evalset's topic.jsonl):
    the prompt as a field, and the index of its label."""
    return {"text": text, "prompt": topic_prompt(text), "label": TOPICS.index(topic),
            "topic": topic}
