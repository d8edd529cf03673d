"""One CT run per language (ct.schedule.mode: one_run): budgets are checkpoints of one run.

Trains a tiny model in-process on CPU: a checkpoint equals the same run stopped there, bit for
bit; one built by resuming from a lower checkpoint equals one trained straight through; a
3-budget ladder trains max(budgets) tokens where independent runs train their sum.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume import tiny_model, weights
from workflow_utils import PROJECT, tiny_config, with_changes

from workflow import models, train
from workflow.artifacts import read_json
from workflow.config import ConfigError, validate_config
from workflow.data import cut_to_budget
from workflow.ladder import RunShape, check_budget
from workflow.plan import Plan

SEQ_LEN = 64  # 63 target tokens per block
TRAIN = {"lr": 3e-3, "min_lr": 1e-4, "warmup_ratio": 0.2, "batch_size": 2, "grad_accum": 2,
         "seq_len": SEQ_LEN, "seed": 3}
STEP = 4 * 63  # target tokens per optimizer step: 2 x 2 blocks of 63
BUDGETS = [2 * STEP, 4 * STEP, 6 * STEP]
SCHEDULE = {"mode": "one_run", "steps": 8}  # the schedule outlasts the largest budget


def recipe(tokens: int, schedule: dict | None = SCHEDULE, share: float | None = None) -> dict:
    params: dict = {"train": TRAIN}
    if schedule is not None:
        params.update(schedule=schedule, tokens=tokens)
    if share is not None:
        params["replay"] = {"share": share}
    return {"stage": "ct", "version": "1", "params": params, "model": "m", "data": f"d{tokens}"}


def prefix_dirs(root: Path, name: str, stream: np.ndarray, sizes: list[int]) -> dict[int, Path]:
    """prepare's outputs at several budgets: prefixes of one stream, stored as uint16 (the
    memory-mapped pipeline's type for a small vocabulary; the trainer must not assume int64)."""
    dirs = {}
    for size in sizes:
        directory = root / f"{name}-{size}"
        directory.mkdir()
        np.save(directory / "tokens.npy", stream[:size].astype(np.uint16))
        dirs[size] = directory
    return dirs


class Stop(Exception):
    """Raised by the interrupting callback once the wanted checkpoint is complete."""


def stop_after(monkeypatch, step: int) -> None:
    """Make the next training stop (raise) right after its checkpoint at ``step`` is saved."""
    real = train._trainer_classes

    def classes():
        trainer_cls, marks_cls = real()

        class StopMarks(marks_cls):
            def on_save(self, args, state, control, **kwargs):
                control = super().on_save(args, state, control, **kwargs)
                if state.global_step == step:
                    raise Stop(step)
                return control

        return trainer_cls, StopMarks

    monkeypatch.setattr(train, "_trainer_classes", classes)


def ct(setup: dict, out: str, tokens: int, *, lower: str | None = None,
       schedule: dict | None = SCHEDULE) -> Path:
    """Build one CT artifact (with its recipe, as the workflow would) and return its dir."""
    root = setup["root"]
    rec = recipe(tokens, schedule)
    train.continual(rec, setup["model"], setup["data"][tokens], root / out,
                    resume_dir=root / lower if lower else None)
    return root / out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ladder")
    stream = np.random.default_rng(1).integers(3, 300, size=max(BUDGETS), dtype=np.int64)
    return {"root": root, "model": tiny_model(root),
            "data": prefix_dirs(root, "tokens", stream, BUDGETS)}


@pytest.fixture(scope="module")
def ladder(setup) -> dict[int, Path]:
    """The 3-budget ladder, each checkpoint continuing from the one below."""
    low, mid, high = BUDGETS
    ct(setup, "ladder-low", low)
    ct(setup, "ladder-mid", mid, lower="ladder-low")
    ct(setup, "ladder-high", high, lower="ladder-mid")
    names = ("low", "mid", "high")
    return {b: setup["root"] / f"ladder-{n}" for b, n in zip(BUDGETS, names, strict=True)}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_checkpoint_is_the_run_stopped_there_and_resuming_equals_straight_through(
    setup, ladder, monkeypatch
):
    root = setup["root"]
    high, mid = BUDGETS[2], BUDGETS[1]
    # The run to the largest budget, stopped once it has trained `mid` target tokens.
    stop_after(monkeypatch, step=mid // STEP)
    with pytest.raises(Stop):
        ct(setup, "straight", high)
    stopped = train.work_dir_for(root / "straight") / f"checkpoint-{mid // STEP}"
    assert (stopped / train.CHECKPOINT_DONE).is_file()
    assert_same_weights(weights(stopped), weights(ladder[mid]))
    assert_same_weights(weights(stopped), weights(ladder[mid] / train.RESUME_DIR))
    # The same run, carried on to its end (it resumes its own work dir), equals the ladder's
    # top, which was built from the checkpoint below it, itself from the one below.
    monkeypatch.undo()
    ct(setup, "straight", high)
    assert_same_weights(weights(root / "straight"), weights(ladder[high]))
    before = weights(setup["model"])
    assert not torch.equal(before["model.embed_tokens.weight"],
                           weights(ladder[high])["model.embed_tokens.weight"])
    # The resume state is safetensors and tensors-only pickles; no TrainingArguments pickle.
    state = sorted(p.name for p in (ladder[high] / train.RESUME_DIR).iterdir())
    assert "model.safetensors" in state and "training_args.bin" not in state
    run = read_json(ladder[high] / train.RESUME_DIR / train.RUN_FILE)
    assert (run["tokens"], run["step"], run["token_counts"][0]) == (high, high // STEP, high)


def test_a_ladder_trains_its_largest_budget_not_the_sum(setup, ladder):
    one_run = [read_json(ladder[b] / "metrics.json") for b in BUDGETS]
    assert [m["tokens_trained"] for m in one_run] == BUDGETS  # cumulative: the run so far
    assert [m["tokens_trained_this_job"] for m in one_run] == [
        BUDGETS[0], BUDGETS[1] - BUDGETS[0], BUDGETS[2] - BUDGETS[1]]
    assert [m["resumed_from_tokens"] for m in one_run] == [0, *BUDGETS[:2]]
    assert sum(m["tokens_trained_this_job"] for m in one_run) == max(BUDGETS)
    assert all(m["schedule_steps"] == SCHEDULE["steps"] for m in one_run)

    independent = []
    for b in BUDGETS:
        out = ct(setup, f"independent-{b}", b, schedule=None)
        independent.append(read_json(out / "metrics.json"))
        assert not (out / train.RESUME_DIR).exists()
    trained = [m["tokens_trained"] for m in independent]
    assert trained == BUDGETS and sum(trained) == sum(BUDGETS)
    print(f"\n3-budget ladder {BUDGETS}: one_run trained {max(BUDGETS)} tokens in all, "
          f"independent {sum(trained)}")


def test_a_replay_ladder_resumes_into_the_same_run(setup, tmp_path):
    # 4:1 replay: 16 target blocks bring 4 replay blocks, 20 blocks = 5 steps of 4.
    share, low, high = 0.2, 16 * 63, 32 * 63
    shape = RunShape.of(TRAIN, share)
    assert shape.is_checkpoint(low) and shape.is_checkpoint(high)
    assert shape.replay_tokens(high) == high // 4
    rng = np.random.default_rng(2)
    target = prefix_dirs(tmp_path, "t", rng.integers(3, 300, high), [low, high])
    replay = prefix_dirs(tmp_path, "r", rng.integers(3, 300, high // 4), [low // 4, high // 4])

    def build(out: str, tokens: int, lower: str | None = None) -> Path:
        rec = recipe(tokens, {"mode": "one_run", "steps": 12}, share=share)
        train.continual(rec, setup["model"], target[tokens], tmp_path / out,
                        replay_dir=replay[tokens // 4],
                        resume_dir=tmp_path / lower if lower else None)
        return tmp_path / out

    build("low", low)
    resumed, straight = build("high", high, lower="low"), build("straight", high)
    assert_same_weights(weights(resumed), weights(straight))
    metrics = read_json(resumed / "metrics.json")
    assert (metrics["tokens_trained"], metrics["replay_tokens_trained"]) == (high, high // 4)
    assert metrics["replay_tokens_trained_this_job"] == (high - low) // 4


def test_run_stream_order_is_a_prefix_and_mixes_four_to_one():
    ratio = Fraction(1, 4)

    def order(n_target: int) -> list[str]:
        target = [{"id": f"t{j}"} for j in range(n_target)]
        replay = [{"id": f"r{k}"} for k in range(n_target // 4)]
        stream = train.RunStream(target, replay, ratio)
        return [stream[i]["id"] for i in range(len(stream))]

    assert order(8) == ["t0", "t1", "t2", "t3", "r0", "t4", "t5", "t6", "t7", "r1"]
    assert order(40)[: len(order(24))] == order(24)


def test_resume_refuses_another_run_or_data_that_is_not_a_prefix(setup, ladder, tmp_path):
    low, mid = BUDGETS[:2]
    other = prefix_dirs(tmp_path, "other", np.full(mid, 7), [mid])[mid]
    with pytest.raises(ValueError, match="not the start of this job's --data"):
        train.continual(recipe(mid), setup["model"], other, tmp_path / "x",
                        resume_dir=ladder[low])
    changed = recipe(mid)
    changed["params"]["train"] = {**TRAIN, "lr": 1e-3}
    with pytest.raises(ValueError, match="another CT run"):
        train.continual(changed, setup["model"], setup["data"][mid], tmp_path / "y",
                        resume_dir=ladder[low])
    with pytest.raises(ValueError, match="one-run schedule"):
        train.continual(recipe(mid, schedule=None), setup["model"], setup["data"][mid],
                        tmp_path / "z", resume_dir=ladder[low])


def test_prepare_cut_at_a_smaller_budget_is_a_prefix_of_a_larger_one():
    texts = [f"cell {i} sheet formula {i * 7} row column page style" for i in range(300)]
    tokenizer = models.train_tokenizer(texts, vocab_size=300)
    small, large = (cut_to_budget(texts, tokenizer, n, "demo") for n in (500, 1500))
    assert np.array_equal(np.asarray(small), np.asarray(large)[:500])


# --------------------------------------------------------------------------- the planner


def one_run_config(budgets: list[int], **schedule) -> dict:
    def change(config: dict) -> None:
        config["budgets"] = budgets
        config["ct"]["train"] = {"lr": 1e-3, "min_lr": 1e-4, "batch_size": 8, "seq_len": 64}
        config["ct"]["schedule"] = {"mode": "one_run", **(schedule or {"steps": 6})}
    return with_changes(tiny_config(), change)


def cts(config: dict, tmp_path: Path) -> dict[tuple[str, int], object]:
    plan = Plan(validate_config(config, PROJECT), workdir=tmp_path)
    return {(a.path.split("/")[3], int(a.path.split("/")[4])): a
            for (rule, _), a in plan.by_key.items() if rule == "ct"}


def test_adding_a_middle_budget_keeps_digests_and_resumes_from_the_nearest_lower(tmp_path):
    step = 8 * 63  # one_run_config's ct: batch_size 8, grad_accum 1, seq_len 64
    before = cts(one_run_config([step, 3 * step]), tmp_path)
    after = cts(one_run_config([step, 2 * step, 3 * step]), tmp_path)
    for key, artifact in before.items():
        assert after[key].digest == artifact.digest
    for lang in ("eu", "gl"):
        low, mid, high = (after[(lang, n * step)] for n in (1, 2, 3))
        assert "resume" not in low.inputs
        assert mid.inputs["resume"] == low.path and high.inputs["resume"] == mid.path
        assert before[(lang, 3 * step)].inputs["resume"] == low.path
        assert high.recipe["params"]["schedule"] == {"mode": "one_run", "steps": 6}
        assert "resume" not in str(high.recipe)  # the lower checkpoint is no recipe part


def test_the_schedule_in_tokens_and_in_steps_is_one_run_and_independent_is_unchanged(tmp_path):
    step = 8 * 63
    by_steps = cts(one_run_config([step], steps=6), tmp_path)
    by_tokens = cts(one_run_config([step], tokens=6 * step), tmp_path)
    assert {k: a.digest for k, a in by_steps.items()} == {
        k: a.digest for k, a in by_tokens.items()}
    default = cts(tiny_config(), tmp_path)
    explicit = cts(with_changes(tiny_config(), lambda c: c["ct"].update(
        schedule={"mode": "independent"})), tmp_path)
    assert {k: a.digest for k, a in default.items()} == {
        k: a.digest for k, a in explicit.items()}
    assert all("schedule" not in a.recipe["params"] for a in default.values())


def test_budgets_that_are_no_checkpoint_of_the_run_fail_at_parse_time(tmp_path):
    with pytest.raises(ConfigError, match=r"budget 2,000 .*504 target tokens per step.*"
                                          r"nearest budgets that do are 1,512 or 2,016"):
        cts(one_run_config([2000]), tmp_path)
    with pytest.raises(ConfigError, match="past the end of the run's 2-step"):
        cts(one_run_config([3 * 504], steps=2), tmp_path)
    with pytest.raises(ConfigError, match="exactly one of tokens or steps"):
        cts(one_run_config([504], steps=2, tokens=1008), tmp_path)
    with pytest.raises(ConfigError, match="epochs must be 1"):
        cts(with_changes(one_run_config([504]), lambda c: c["ct"]["train"].update(epochs=2)),
            tmp_path)
    # With 4:1 replay, 32 target blocks bring 8 replay blocks: 40 blocks, 5 steps of 8.
    assert check_budget(32 * 63, RunShape(64, 8, 1, 0.2), 10, "budgets") == 5
