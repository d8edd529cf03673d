"""Instruction data for SFT: read a dataset, normalise it to chat messages, tokenise it with
the loss on the responses only.

Where the data comes from (config ``sft.data``, README "Instruction data"):

- ``path``: a local ``.jsonl`` / ``.jsonl.gz`` file (one JSON object per line) or a
  ``.parquet`` file; the plan identifies it by its sha256, not its path;
- ``hub``: a hub dataset id with a pinned ``revision`` (and optional ``subset``,
  ``data_files``, ``split``), loaded with ``datasets`` when the SFT job runs.

Each record is one conversation (``format``):

- ``prompt_response``: ``prompt_field`` (a field name, or a list of names whose non-empty
  values are joined by a blank line, e.g. Alpaca's ``[instruction, input]``) and
  ``response_field``: a user turn and an assistant turn;
- ``messages``: ``messages_field`` holds ``[{"role": ..., "content": ...}, ...]`` with roles
  system, user, assistant; it starts with a system or user turn and ends with an assistant turn;
- ``auto``: ``messages`` where the record has ``messages_field``, else ``prompt_response``.

A malformed record is an error naming the file and line (parquet and hub data: the row) and
the key at fault, raised before any model is loaded.

Tokenisation (:func:`encode`). With the model's chat template (``sft.chat_template``: ``auto``
uses it when the tokenizer has one, ``true`` requires one, ``false`` never uses it) the
conversation is rendered by ``apply_chat_template`` and the loss covers each assistant turn as
the template renders it (its content and end-of-turn marker), found as the text between the
rendering of the turns before it plus the generation prompt and the rendering through it.
Without a template the plain format is used: the message contents in order, ``separator``
between consecutive messages, each assistant turn followed by EOS; the loss covers the
assistant contents and their EOS. The split between prompt and answer tokens follows
lm-eval's ``_encode_pair`` (encode context + answer; the answer is what follows the context's
ids), so that a plain prompt/response task trains exactly the tokens lm-eval scores.

Truncation to ``seq_len`` keeps at least one response token, or drops the example (counted in
metrics.json): a conversation that fits is kept; else one whose first response ends within
``seq_len`` is cut on the right; else, when that response fits after at least one context
token, the context loses tokens on the left (lm-eval's left truncation: the prompt's end,
next to the answer, is kept); else, when the prompt alone is shorter than ``seq_len``, the
response is cut on the right; else the example is dropped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflow.corpus import CorpusError, iter_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# The spec keys that say how records read, as opposed to where the data is.
FORMAT_KEYS = ("format", "prompt_field", "response_field", "messages_field", "separator")
HUB_KEYS = ("hub", "revision", "subset", "data_files", "split")

Message = dict[str, str]


class InstructionDataError(ValueError):
    """Instruction data that cannot be used as documented; the message names where."""


# --------------------------------------------------------------------------- the spec


def source_kind(spec: dict[str, Any]) -> str:
    """Which source the spec names, ``path`` or ``hub``: exactly one must be set."""
    has_path, has_hub = spec.get("path") is not None, spec.get("hub") is not None
    if has_path == has_hub:
        raise InstructionDataError(
            "'sft.data': give exactly one of 'path' (a local .jsonl, .jsonl.gz or .parquet "
            "file) and 'hub' (a hub dataset id with a revision)"
        )
    return "path" if has_path else "hub"


def check_spec(spec: dict[str, Any], resolved: Path | None) -> None:
    """The checks a config gets at parse time, before any job: ``resolved`` is the local file
    a ``path`` resolves to (None for a hub dataset)."""
    if source_kind(spec) == "hub":
        if not spec.get("revision"):
            raise InstructionDataError(
                f"'sft.data.revision': required with 'hub' ({spec['hub']}): pin a commit of "
                "the dataset so that the recipe, and the SFT model, mean one thing"
            )
        return
    if resolved is None:
        raise InstructionDataError("'sft.data.path': no file given")
    if not resolved.name.endswith(LOCAL_SUFFIXES):
        raise InstructionDataError(
            f"'sft.data.path': {resolved} is not a {', '.join(LOCAL_SUFFIXES)} file"
        )
    if not resolved.is_file():
        raise InstructionDataError(f"'sft.data.path': file not found: {resolved}")
    hub_only = [key for key in HUB_KEYS[1:] if key != "split" and spec.get(key) is not None]
    if hub_only:
        raise InstructionDataError(f"'sft.data.{hub_only[0]}': only for a 'hub' dataset")


def format_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of the spec that decides how records read (the recipe's params.data)."""
    return {key: spec[key] for key in FORMAT_KEYS}


# --------------------------------------------------------------------------- records


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise InstructionDataError(f"{path}: reading parquet needs the pyarrow package") from None

    try:
        reader = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several kinds for a bad file
        raise InstructionDataError(f"{path}: not a readable parquet file ({error})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def _hub_name(spec: dict[str, Any]) -> str:
    return f"hub dataset {spec['hub']}@{spec['revision']}"


def _hub_dataset(spec: dict[str, Any]) -> Any:
    """The split of a hub dataset, through ``datasets`` (cached in HF_HOME)."""
    name = _hub_name(spec)
    try:
        import datasets
    except ModuleNotFoundError:
        raise InstructionDataError(f"{name}: needs the datasets package") from None
    try:
        return datasets.load_dataset(
            spec["hub"],
            name=spec["subset"],
            revision=spec["revision"],
            data_files=spec["data_files"],
            split=spec["split"],
        )
    except Exception as error:  # offline, unknown id or revision, bad subset: say which
        raise InstructionDataError(
            f"{name} (subset {spec['subset']}, split {spec['split']}) could not be loaded: "
            f"{type(error).__name__}: {error}. Is the hub reachable from this job? Or download "
            "it once and point sft.data.path at a local .jsonl or .parquet copy"
        ) from None


def iter_local_records(path: Path | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record of a local file, ``where`` its file and line
    (parquet: row)."""
    if path is None or not path.is_file():
        raise InstructionDataError(f"instruction data file not found: {path}")
    if path.name.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise InstructionDataError(f"{path}: unsupported format (use {', '.join(LOCAL_SUFFIXES)})")
    try:
        for number, record in iter_jsonl(path, InstructionDataError):
            yield f"{path}:{number}", record
    except CorpusError as error:
        raise InstructionDataError(str(error)) from None


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise InstructionDataError(f"{where}: missing key {key!r} (have: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise InstructionDataError(f"{where}: key {key!r} must be a string, got {value!r:.60}")
    return value


def normalise(record: Any, params: dict[str, Any], where: str) -> list[Message]:
    """One record as a conversation: ``[{"role", "content"}, ...]``, checked."""
    if not isinstance(record, dict):
        raise InstructionDataError(f"{where}: each record must be a JSON object")
    kind = params["format"]
    if kind == "auto":
        kind = "messages" if params["messages_field"] in record else "prompt_response"
    if kind == "prompt_response":
        fields = params["prompt_field"]
        fields = [fields] if isinstance(fields, str) else fields
        parts = [_text(record, field, where) for field in fields]
        prompt = "\n\n".join(part for part in parts if part.strip())
        response = _text(record, params["response_field"], where)
        if not prompt.strip():
            raise InstructionDataError(f"{where}: key {fields[0]!r} is empty")
        if not response.strip():
            raise InstructionDataError(f"{where}: key {params['response_field']!r} is empty")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    key = params["messages_field"]
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise InstructionDataError(
            f"{where}: key {key!r} must be a non-empty list of {{role, content}} objects"
        )
    out: list[Message] = []
    for index, message in enumerate(messages):
        at = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise InstructionDataError(f"{where}: key {at!r} must be an object {{role, content}}")
        role = message.get("role")
        if role not in ROLES:
            raise InstructionDataError(
                f"{where}: key '{at}.role' must be one of {', '.join(ROLES)}, got {role!r}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise InstructionDataError(f"{where}: key '{at}.content' must be a string")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise InstructionDataError(f"{where}: key '{key}[0].role': a conversation starts with "
                                   "a system or user turn")
    if out[-1]["role"] != "assistant":
        raise InstructionDataError(
            f"{where}: key '{key}[{len(out) - 1}].role': the last turn must be the assistant's "
            "(the response the loss is computed on)"
        )
    return out


def load_conversations(
    spec: dict[str, Any], path: Path | None, examples: int, select: str, seed: int
) -> tuple[list[list[Message]], int]:
    """``examples`` conversations, and how many records the source holds (of a local file
    read with ``first``: how many were read). ``first``: the first ones in source order;
    ``sample``: a sample seeded by ``seed``, kept in source order. Every record read is
    checked (of a hub dataset: the chosen rows)."""
    params = format_params(spec)
    if source_kind(spec) == "hub":
        data = _hub_dataset(spec)
        available = len(data)
        if select == "sample" and available > examples:
            rows: Any = sorted(random.Random(seed).sample(range(available), examples))
        else:
            rows = range(min(examples, available))
        name = _hub_name(spec)
        conversations = [normalise(data[i], params, f"{name}: row {i + 1}") for i in rows]
    else:
        conversations = []
        for where, record in iter_local_records(path):
            conversations.append(normalise(record, params, where))
            if select == "first" and len(conversations) == examples:
                break
        available = len(conversations)
        if select == "sample" and available > examples:
            chosen = sorted(random.Random(seed).sample(range(available), examples))
            conversations = [conversations[i] for i in chosen]
    if not conversations:
        source = spec.get("path") or spec["hub"]
        raise InstructionDataError(f"instruction data {source}: no records")
    return conversations, available


# --------------------------------------------------------------------------- tokens


def use_chat_template(tokenizer: Any, option: Any, model: str) -> bool:
    """``sft.chat_template`` resolved for this tokenizer."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if option is True and not has:
        raise InstructionDataError(
            f"'sft.chat_template' is true but the tokenizer of {model} has no chat template "
            "(use auto or false for a base model without one)"
        )
    return has if option == "auto" else bool(option)


@dataclass(frozen=True)
class Encoder:
    """Turns conversations into ``{"input_ids", "labels"}`` examples for one tokenizer."""

    tokenizer: Any
    seq_len: int
    chat_template: bool
    separator: str = ""

    def encode(self, messages: list[Message], where: str = "") -> dict[str, list[int]] | None:
        """One example, truncated to ``seq_len`` (module doc), or None when dropped."""
        if self.chat_template:
            ids, labels = self._templated(messages, where)
        else:
            ids, labels = self._plain(messages)
        return truncate(ids, labels, self.seq_len)

    def _plain(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        tokenizer = self.tokenizer
        ids: list[int] = []
        labels: list[int] = []
        pending = ""  # context not yet tokenised: everything since the last answer
        for index, message in enumerate(messages):
            if index:
                pending += self.separator
            if message["role"] != "assistant":
                pending += message["content"]
                continue
            first = not ids  # special tokens (a BOS) only at the very start, as lm-eval
            answer = message["content"]
            context = tokenizer(pending, add_special_tokens=first)["input_ids"]
            whole = tokenizer(pending + answer, add_special_tokens=first)["input_ids"]
            if whole[: len(context)] == context and len(whole) > len(context):
                answer_ids = whole[len(context) :]
            else:  # a merge across the boundary: encode the answer on its own
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            answer_ids = [*answer_ids, tokenizer.eos_token_id]
            ids += context + answer_ids
            labels += [IGNORE] * len(context) + answer_ids
            pending = ""
        return ids, labels

    def _templated(self, messages: list[Message], where: str) -> tuple[list[int], list[int]]:
        tokenizer = self.tokenizer

        def render(turns: list[Message], prompt: bool) -> str:
            text = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=prompt
            )
            return text if isinstance(text, str) else str(text)

        full = render(messages, False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:index], True), render(messages[: index + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise InstructionDataError(
                    f"{where}: the chat template does not render the conversation's first "
                    f"{index} turns as a prefix of the whole, so the answer of turn {index} "
                    "cannot be located; use sft.chat_template: false"
                )
            spans.append((len(before), len(through)))
        if not getattr(tokenizer, "is_fast", False):
            raise InstructionDataError(
                "a chat template needs a fast tokenizer (its character offsets locate the "
                "answers); use sft.chat_template: false"
            )
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        # A token is trained if it overlaps an answer: one that merges the generation
        # prompt's last character with the answer's first is what the model must produce.
        labels = [
            token if any(begin < end and stop > start for start, end in spans) else IGNORE
            for token, (begin, stop) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels


def truncate(
    ids: list[int], labels: list[int], seq_len: int
) -> dict[str, list[int]] | None:
    """Cut an example to ``seq_len`` keeping at least one trained response token (a label
    after position 0, as the shifted loss sees it), or None (module doc)."""
    targets = [i for i, label in enumerate(labels) if label != IGNORE and i > 0]
    if not targets:
        return None
    if len(ids) <= seq_len:
        return {"input_ids": ids, "labels": [IGNORE, *labels[1:]]}
    start = targets[0]  # the first response: [start, end)
    end = start
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    if end <= seq_len or start < seq_len and end - start >= seq_len:
        window = slice(0, seq_len)  # the prompt whole, the response (or later turns) cut
    elif end - start < seq_len:
        window = slice(end - seq_len, end)  # the prompt loses its start
    else:
        return None
    return {"input_ids": ids[window], "labels": [IGNORE, *labels[window][1:]]}
