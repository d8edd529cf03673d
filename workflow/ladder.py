"""One CT run per language, with its budgets as checkpoints (``ct.schedule.mode: one_run``).

The arithmetic that the planner (at parse time) and the trainer share, free of heavy imports.

The run reads one fixed stream of blocks. Target blocks are train.py's packed blocks (seq_len
tokens overlapping by one: stride = seq_len - 1 targets each). With replay share s, replay
blocks come in at r = s / (1 - s) per target block, in an order no budget changes: after target
block j (counting from 1) come replay blocks until floor(j * r) of them have been placed. The
run does not shuffle: an optimizer step takes the next batch_size * grad_accum blocks, so the
checkpoint at budget b has trained exactly the first b target tokens of the corpus (what an
independent run at b trains, in stream order), and it is a prefix of every larger budget's run.

A budget is a checkpoint only where it ends both a block and a step: b = k * stride with
k + floor(k * r) a multiple of the blocks per step. Budgets are exact (the project's promise),
so any other budget is refused at parse time, naming the nearest budgets that work.

The learning-rate schedule (linear warmup over warmup_ratio of it, then cosine to min_lr)
spans the run: ``ct.schedule.steps`` optimizer steps, or the steps that ``ct.schedule.tokens``
target tokens take. No budget may lie past its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from workflow.config import ConfigError

MODES = ("independent", "one_run")


def replay_ratio(share: float | None) -> Fraction:
    """Replay blocks per target block, exactly: a share of 0.2 is 1/5, so 4:1 is exactly 1/4."""
    if share is None:
        return Fraction(0)
    s = Fraction(str(share))  # the decimal the user wrote, not the nearest binary float
    return s / (1 - s)


@dataclass(frozen=True)
class RunShape:
    """How a one-run stream is cut into blocks and steps."""

    seq_len: int
    batch_size: int
    grad_accum: int
    share: float | None = None

    @classmethod
    def of(cls, train: dict[str, Any], share: float | None) -> RunShape:
        return cls(train["seq_len"], train["batch_size"], train["grad_accum"], share)

    @property
    def stride(self) -> int:
        """Target tokens per block."""
        return self.seq_len - 1

    @property
    def blocks_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def replay_blocks(self, target_blocks: int) -> int:
        ratio = replay_ratio(self.share)
        return math.floor(target_blocks * ratio)

    def blocks(self, tokens: int) -> int:
        """Blocks (target and replay) of the stream up to ``tokens`` target tokens."""
        target = math.ceil(tokens / self.stride)
        return target + self.replay_blocks(target)

    def replay_tokens(self, tokens: int) -> int:
        """Replay tokens the run has trained by the checkpoint at ``tokens`` target tokens."""
        return self.replay_blocks(tokens // self.stride) * self.stride

    def steps(self, tokens: int) -> int:
        """Optimizer steps that ``tokens`` target tokens take (the last one possibly partial)."""
        return math.ceil(self.blocks(tokens) / self.blocks_per_step)

    def is_checkpoint(self, tokens: int) -> bool:
        return tokens % self.stride == 0 and self.blocks(tokens) % self.blocks_per_step == 0

    def neighbours(self, tokens: int) -> tuple[int | None, int]:
        """The nearest checkpoint budgets below (None if none) and above ``tokens``."""
        # The pattern of valid block counts repeats every lcm(bps, denominator) target blocks.
        period = self.blocks_per_step * replay_ratio(self.share).denominator
        k = tokens // self.stride
        below = next((j for j in range(k, max(0, k - period) - 1, -1)
                      if j and self.is_checkpoint(j * self.stride)), None)
        above = next(j for j in range(k + 1, k + period + 2) if self.is_checkpoint(j * self.stride))
        return (below * self.stride if below else None), above * self.stride

    def describe(self) -> str:
        text = (f"seq_len {self.seq_len} gives {self.stride} target tokens per block, "
                f"batch_size {self.batch_size} x grad_accum {self.grad_accum} = "
                f"{self.blocks_per_step} blocks per step")
        if self.share is None:
            return f"{text}, so {self.stride * self.blocks_per_step} target tokens per step"
        return f"{text}, with {replay_ratio(self.share)} replay blocks per target block"


def schedule_spec(raw: Any, where: str) -> dict[str, Any] | None:
    """A ``ct.schedule`` value, checked: None for independent runs, else ``{mode, tokens}`` or
    ``{mode, steps}``."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("mode") not in MODES:
        raise ConfigError(f"'{where}.mode': must be one of {', '.join(MODES)}, got {raw!r}")
    given = {key: raw.get(key) for key in ("tokens", "steps") if raw.get(key) is not None}
    if raw["mode"] == "independent":
        if given:
            raise ConfigError(f"'{where}': {', '.join(given)} only apply to mode one_run (an "
                              "independent run's schedule spans its own budget)")
        return None
    if len(given) != 1:
        raise ConfigError(f"'{where}': mode one_run needs exactly one of tokens or steps "
                          "(the length of the learning-rate schedule), got "
                          f"{', '.join(given) or 'neither'}")
    (key, value), = given.items()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"'{where}.{key}': must be an integer >= 1, got {value!r}")
    return {"mode": "one_run", key: value}


def schedule_steps(schedule: dict[str, Any], shape: RunShape) -> int:
    """Optimizer steps of the run's learning-rate schedule."""
    if "steps" in schedule:
        return schedule["steps"]
    return shape.steps(schedule["tokens"])


def check_budget(budget: int, shape: RunShape, total_steps: int, where: str) -> int:
    """The run's step count at ``budget``; a ConfigError naming the budget if it is no
    checkpoint of the run or lies past the schedule's end."""
    if not shape.is_checkpoint(budget):
        below, above = shape.neighbours(budget)
        nearest = f"{below:,} or {above:,}" if below else f"{above:,}"
        raise ConfigError(
            f"'{where}': budget {budget:,} does not end an optimizer step of the one CT run "
            f"({shape.describe()}); the nearest budgets that do are {nearest}"
        )
    steps = shape.steps(budget)
    if steps > total_steps:
        raise ConfigError(
            f"'{where}': budget {budget:,} takes {steps:,} optimizer steps, past the end of the "
            f"run's {total_steps:,}-step learning-rate schedule (ct.schedule): lengthen it"
        )
    return steps
