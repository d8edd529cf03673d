"""Build the shipped demo corpus from Debian's LibreOffice help packages.

The help pages of LibreOffice 7.4 exist in English and, translated paragraph by paragraph, in
Basque, Catalan, Galician and Spanish. Every paragraph carries an id (``par_id…``, ``hd_id…``)
that is the same in every language, so a translation can be compared with its English original:
a paragraph left untranslated is shipped in English and is dropped here. The top folder of each
page (scalc, swriter, …) is the topic label of the cross-lingual classification task.

Rebuild the committed data (downloads five .deb files with apt, about 17 MB)::

    python -m workflow.demo_corpus --out data/libreoffice-help

or from .deb files already at hand::

    python -m workflow.demo_corpus --out data/libreoffice-help --debs DIR

Outputs ``{lang}.jsonl.gz`` (one paragraph per line: id, page, topic, split, text),
``manifest.json`` (package versions, .deb hashes, counts), ``NOTICE`` and ``recipe.json``.

The demo's SFT data, the English topic task as an instruction dataset (prompt/response records,
the prompt and labels of workflow/prompts.py), is written with ``--instructions DIR``: from the
corpus just built, or with ``--from-corpus`` from one already built::

    python -m workflow.demo_corpus --instructions data/topic-instructions \
        --from-corpus data/libreoffice-help

Outputs ``en.jsonl.gz`` (id, topic, prompt, response), ``manifest.json`` (counts),
``NOTICE`` and ``recipe.json``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import random
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from tqdm import tqdm

from workflow.artifacts import atomic_dir, sha256_file, write_json, write_recipe
from workflow.prompts import TOPICS, topic_example

log = logging.getLogger(__name__)

STAGE = "demo_corpus"
VERSION = "1"
INSTRUCTIONS_STAGE = "topic_instructions"
INSTRUCTIONS_VERSION = "1"
INSTRUCTIONS_SEED = 0
# Debian 12 (bookworm) point release that was current when the committed data was built. Point
# releases replace older ones on the mirrors: pass --version (or --debs) if this one is gone.
DEBIAN_VERSION = "4:7.4.7-1+deb12u14"
ENGLISH = "en"
TARGETS = ("eu", "ca", "gl", "es")
LANGS = (ENGLISH, *TARGETS)
# Our language code -> (Debian package, directory under usr/share/libreoffice/help).
PACKAGES: dict[str, tuple[str, str]] = {
    "en": ("libreoffice-help-en-us", "en-US"),
    "eu": ("libreoffice-help-eu", "eu"),
    "ca": ("libreoffice-help-ca", "ca"),  # the package also holds ca-valencia: not used
    "gl": ("libreoffice-help-gl", "gl"),
    "es": ("libreoffice-help-es", "es"),
}
HELP_ROOT = Path("usr/share/libreoffice/help")
MIN_CHARS = 40  # paragraphs must be longer than this: shorter ones are mostly UI labels
TEST_FRACTION = 0.12
PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td"})
ID_PREFIXES = ("par_id", "hd_id")
# Elements html.parser reports without an end tag; they must not be pushed on the stack.
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)

NOTICE = """\
The files in this directory are extracted from the LibreOffice 7.4 help as packaged by Debian
({packages}, version {version}).

This Source Code Form is subject to the terms of the Mozilla Public License, v. 2.0. If a copy
of the MPL was not distributed with this file, You can obtain one at
https://www.mozilla.org/MPL/2.0/.

Source: https://git.libreoffice.org/help and https://git.libreoffice.org/translations
(Debian source package: libreoffice, https://packages.debian.org/source/bookworm/libreoffice).
"""


class DemoCorpusError(RuntimeError):
    """A download, package or page that cannot be used; the message names it."""


# --------------------------------------------------------------------------- HTML paragraphs


def normalise_space(text: str) -> str:
    return " ".join(text.split())


class _ParagraphParser(HTMLParser):
    """Collects ``(id, text)`` of every paragraph element whose id starts with par_id/hd_id.

    Inline switches (``<span class="switchinline">``) hold one hidden case per system or
    application (MAC, WIN, CALC, …) plus usually a ``default…`` case; the text keeps only the
    default case (or the first case when there is none), as the help viewer shows one of them.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self._stack: list[tuple[str, str]] = []  # (tag, role) for every open element
        self._para_id: str | None = None
        self._sinks: list[list[str]] = []  # where text goes; [-1] is the innermost
        self._switches: list[dict[str, str | None]] = []
        self._case_ids: list[str] = []
        self._skip = 0  # depth inside hidden text that is not a switch case

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        element_id = attributes.get("id", "")
        if tag in VOID_TAGS:
            if tag == "br" and self._para_id is not None:
                self._text(" ")
            return
        role = ""
        if self._para_id is None:
            if tag in PARAGRAPH_TAGS and element_id.startswith(ID_PREFIXES):
                role = "para"
                self._para_id = element_id
                self._sinks = [[]]
        elif self._skip:
            role = "skip"
            self._skip += 1
        elif "switchinline" in attributes.get("class", "").split():
            role = "switch"
            self._switches.append({"default": None, "first": None})
            self._sinks.append([])  # whitespace between the cases: discarded
        elif "hidden" in attributes:
            if self._stack and self._stack[-1][1] == "switch":
                role = "case"
                self._case_ids.append(element_id)
                self._sinks.append([])
            else:
                role = "skip"
                self._skip = 1
        self._stack.append((tag, role))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/> and the like: never push, or the stack would wait forever for an end tag.
        if tag == "br" and self._para_id is not None:
            self._text(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or not any(open_tag == tag for open_tag, _ in self._stack):
            return  # a stray end tag: ignore rather than unbalance the stack
        while self._stack:
            open_tag, role = self._stack.pop()
            self._close(role)
            if open_tag == tag:
                break

    def _close(self, role: str) -> None:
        if role == "skip":
            self._skip -= 1
        elif role == "case":
            text = "".join(self._sinks.pop())
            case_id = self._case_ids.pop()
            frame = self._switches[-1]
            if case_id.startswith("default"):
                frame["default"] = text
            elif frame["first"] is None:
                frame["first"] = text
        elif role == "switch":
            self._sinks.pop()
            frame = self._switches.pop()
            chosen = frame["default"] if frame["default"] is not None else frame["first"]
            self._text(chosen or "")
        elif role == "para":
            assert self._para_id is not None
            self.paragraphs.append((self._para_id, normalise_space("".join(self._sinks[0]))))
            self._para_id = None
            self._sinks = []
            self._switches = []
            self._case_ids = []
            self._skip = 0

    def _text(self, data: str) -> None:
        if self._para_id is not None and not self._skip and self._sinks:
            self._sinks[-1].append(data)

    def handle_data(self, data: str) -> None:
        self._text(data)

    def close(self) -> None:
        super().close()
        while self._stack:  # a page cut short: close what is open so its last paragraph counts
            self._close(self._stack.pop()[1])


def extract_paragraphs(html: str) -> list[tuple[str, str]]:
    """``(id, text)`` of each id-carrying paragraph of a help page, in document order."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def read_pages(text_root: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Paragraphs of every ``*.html`` under ``text_root``, keyed by the path under it."""
    text_root = Path(text_root)
    if not text_root.is_dir():
        raise DemoCorpusError(f"help text directory not found: {text_root}")
    files = sorted(text_root.rglob("*.html"))
    if not files:
        raise DemoCorpusError(f"no .html help pages under {text_root}")
    pages = {}
    for path in tqdm(files, desc=f"parse {text_root.parent.name}", unit="page", leave=False):
        pages[path.relative_to(text_root).as_posix()] = extract_paragraphs(
            path.read_text(encoding="utf-8")
        )
    return pages


# --------------------------------------------------------------------------- records


def page_topic(page: str) -> str | None:
    """The top folder of a page when it is one of the known topics, else None."""
    top = page.split("/", 1)[0]
    return top if top in TOPICS and "/" in page else None


def page_split(page: str, test_fraction: float = TEST_FRACTION) -> str:
    """Split by page, so every language holds out the same pages."""
    bucket = int(hashlib.sha256(page.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    return "test" if bucket < test_fraction else "train"


@dataclass
class LanguageStats:
    paragraphs: int = 0  # distinct (page, id) pairs on pages with a known topic
    untranslated: int = 0  # equal to an English paragraph with the same page and id
    no_english: int = 0  # no English paragraph with the same page and id
    short: int = 0
    duplicate: int = 0  # text already kept (sections embedded in several pages)


def _compare_key(text: str) -> str:
    # Some untranslated paragraphs differ from English by a space only ("( Number" / "(Number").
    return "".join(text.split())


def build_records(
    pages: dict[str, list[tuple[str, str]]],
    english: dict[str, list[tuple[str, str]]] | None,
    min_chars: int = MIN_CHARS,
    test_fraction: float = TEST_FRACTION,
) -> tuple[list[dict[str, Any]], LanguageStats]:
    """Records of one language, sorted by page then position; ``english`` None for English.

    A target paragraph is kept only if an English paragraph with the same page and id exists and
    none of them equals it (ignoring whitespace): the help ships untranslated paragraphs in
    English. Ids can repeat within a page (embedded sections, in a different order per
    language), hence the comparison against all of them. Each (page, id) gives at most one
    record, its first kept occurrence, so record ids are unique.
    """
    stats = LanguageStats()
    records: list[dict[str, Any]] = []
    seen_texts: set[str] = set()
    for page in sorted(pages):
        topic = page_topic(page)
        if topic is None:
            continue
        split = page_split(page, test_fraction)
        reference: dict[str, set[str]] = {}
        for para_id, text in (english or {}).get(page, []):
            reference.setdefault(para_id, set()).add(_compare_key(text))
        ids = {para_id for para_id, _ in pages[page]}
        stats.paragraphs += len(ids)
        rejected: dict[str, str] = {}  # para id -> why its occurrences were dropped
        for para_id, text in pages[page]:
            if para_id not in ids:
                continue  # already kept
            if english is not None and para_id not in reference:
                rejected[para_id] = "no_english"
            elif english is not None and _compare_key(text) in reference[para_id]:
                rejected.setdefault(para_id, "untranslated")
            elif len(text) <= min_chars:
                rejected.setdefault(para_id, "short")
            elif text in seen_texts:
                rejected.setdefault(para_id, "duplicate")
            else:
                ids.discard(para_id)
                rejected.pop(para_id, None)
                seen_texts.add(text)
                records.append(
                    {
                        "id": f"{page}#{para_id}",
                        "page": page,
                        "topic": topic,
                        "split": split,
                        "text": text,
                    }
                )
        for reason in rejected.values():
            setattr(stats, reason, getattr(stats, reason) + 1)
    return records, stats


def write_jsonl_gz(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Byte-reproducible gzip: no file name and mtime 0 in the header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        for record in records:
            line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
            gz.write(line.encode("utf-8"))
    Path(path).write_bytes(buffer.getvalue())


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "paragraphs": len(records),
        "pages": len({record["page"] for record in records}),
        "per_split": dict(sorted(Counter(record["split"] for record in records).items())),
        "per_topic": dict(sorted(Counter(record["topic"] for record in records).items())),
        "text_bytes": sum(len(record["text"].encode("utf-8")) for record in records),
    }


# --------------------------------------------------------------------------- packages


def _run(command: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise DemoCorpusError(
            f"command not found: {command[0]} (needs Debian's apt, dpkg)"
        ) from None
    except subprocess.CalledProcessError as error:
        raise DemoCorpusError(
            f"{' '.join(command)} failed ({error.returncode}): {error.stderr.strip()}"
        ) from None
    return result.stdout


def download_debs(directory: Path, langs: Iterable[str], version: str) -> None:
    """``apt-get download`` the help packages (run ``apt-get update`` first on a fresh box)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = [f"{PACKAGES[lang][0]}={version}" for lang in langs]
    log.info("apt-get download %s", " ".join(specs))
    try:
        _run(["apt-get", "download", *specs], cwd=directory)
    except DemoCorpusError as error:
        raise DemoCorpusError(
            f"{error}. Run `apt-get update`, check `apt-cache policy {PACKAGES['eu'][0]}` for "
            "the available version and pass it with --version, or pass --debs DIR"
        ) from None


def deb_fields(path: Path) -> dict[str, str]:
    output = _run(["dpkg-deb", "--field", str(path), "Package", "Version"])
    fields = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    if "Package" not in fields or "Version" not in fields:
        raise DemoCorpusError(f"{path}: no Package/Version in its control file")
    return fields


def find_deb(directory: Path, lang: str, version: str) -> Path:
    """The one .deb of ``lang``'s help package at ``version`` in ``directory``."""
    package = PACKAGES[lang][0]
    candidates = [
        path
        for path in sorted(directory.glob(f"{package}_*.deb"))
        if deb_fields(path) == {"Package": package, "Version": version}
    ]
    if len(candidates) != 1:
        found = sorted(path.name for path in directory.glob(f"{package}_*.deb"))
        raise DemoCorpusError(
            f"need exactly one {package} .deb at version {version} in {directory}, found "
            f"{len(candidates)} (files there: {found or 'none'})"
        )
    return candidates[0]


def unpack_help(deb: Path, lang: str, destination: Path) -> Path:
    """``dpkg-deb -x`` a package; returns its ``text/`` directory."""
    destination.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(destination)])
    text_root = destination / HELP_ROOT / PACKAGES[lang][1] / "text"
    if not text_root.is_dir():
        raise DemoCorpusError(f"{deb.name}: no {HELP_ROOT / PACKAGES[lang][1] / 'text'} inside")
    return text_root


# --------------------------------------------------------------------------- build


def build(
    out: str | Path,
    workdir: Path,
    debs: Path | None = None,
    version: str = DEBIAN_VERSION,
    langs: tuple[str, ...] = LANGS,
    force: bool = False,
) -> dict[str, Any]:
    """Download (unless ``debs``), unpack and convert; returns the manifest."""
    out = Path(out)
    unknown = [lang for lang in langs if lang not in PACKAGES]
    if unknown or ENGLISH not in langs:
        raise DemoCorpusError(f"--langs must include 'en' and only {LANGS}, got {list(langs)}")
    if out.exists() and any(out.iterdir()) and not force:
        raise DemoCorpusError(f"{out} exists and is not empty: pass --force to rebuild it")
    if debs is None:
        debs = workdir / "debs"
        download_debs(debs, langs, version)
    deb_paths = {lang: find_deb(debs, lang, version) for lang in langs}

    pages = {}
    for lang in langs:
        text_root = unpack_help(deb_paths[lang], lang, workdir / "unpacked" / lang)
        pages[lang] = read_pages(text_root)
        log.info("%s: %d pages", lang, len(pages[lang]))

    params = {
        "min_chars": MIN_CHARS,
        "test_fraction": TEST_FRACTION,
        "langs": list(langs),
        "debian_version": version,
    }
    manifest: dict[str, Any] = {"params": params, "languages": {}}
    recipe = {"stage": STAGE, "version": VERSION, "params": params, "inputs": {}}
    # The corpus writes its own manifest.json (languages, sizes): no integrity manifest here.
    with atomic_dir(out, manifest=False) as tmp:
        for lang in langs:
            english = None if lang == ENGLISH else pages[ENGLISH]
            records, stats = build_records(pages[lang], english)
            write_jsonl_gz(tmp / f"{lang}.jsonl.gz", records)
            deb_hash = sha256_file(deb_paths[lang])
            recipe["inputs"][lang] = deb_hash
            manifest["languages"][lang] = {
                "package": PACKAGES[lang][0],
                "version": version,
                "deb": deb_paths[lang].name,
                "deb_sha256": deb_hash,
                "help_dir": PACKAGES[lang][1],
                "file": f"{lang}.jsonl.gz",
                "file_sha256": sha256_file(tmp / f"{lang}.jsonl.gz"),
                "dropped": {
                    "untranslated": stats.untranslated,
                    "no_english_counterpart": stats.no_english,
                    f"not_longer_than_{MIN_CHARS}_chars": stats.short,
                    "duplicate_text": stats.duplicate,
                },
                "paragraphs_seen": stats.paragraphs,
                **summarise(records),
            }
            log.info("%s: kept %d of %d paragraphs", lang, len(records), stats.paragraphs)
        write_json(tmp / "manifest.json", manifest)
        packages = ", ".join(PACKAGES[lang][0] for lang in langs)
        (tmp / "NOTICE").write_text(NOTICE.format(packages=packages, version=version))
        _seal(tmp, out, recipe)
    return manifest


def _seal(tmp: Path, out: Path, recipe: dict[str, Any]) -> None:
    """Finish a shipped dataset in its temporary directory: its recipe, world-readable modes
    (mkdtemp/mkstemp create owner-only entries), and the old ``out`` removed only now that the
    new one is complete (--force); atomic_dir then renames ``tmp`` into place."""
    write_recipe(tmp, recipe)
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)


# --------------------------------------------------------------------------- SFT data


def topic_instructions(
    records: list[dict[str, Any]], seed: int = INSTRUCTIONS_SEED
) -> list[dict[str, Any]]:
    """The training paragraphs of one language as topic instructions, in round-robin order
    over topics (each topic's paragraphs shuffled with ``seed``): the first n records are
    balanced over topics as far as the smaller topics allow, so ``sft.examples: n`` with
    ``select: first`` takes a balanced set."""
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["split"] == "train" and record.get("topic") is not None:
            by_topic.setdefault(record["topic"], []).append(record)
    if not by_topic:
        raise DemoCorpusError("no training paragraphs with a topic to build instructions from")
    rng = random.Random(seed)
    pools = [rng.sample(by_topic[topic], len(by_topic[topic])) for topic in sorted(by_topic)]
    ordered = []
    for depth in range(max(len(pool) for pool in pools)):
        ordered += [pool[depth] for pool in pools if depth < len(pool)]
    return [
        {"id": record["id"], "topic": record["topic"], **topic_example(record["text"],
                                                                        record["topic"])}
        for record in ordered
    ]


def write_instructions(corpus: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Write the topic instruction dataset built from ``corpus`` (an English ``.jsonl.gz`` of
    this builder) to the directory ``out``; returns its manifest."""
    if not corpus.is_file():
        raise DemoCorpusError(f"corpus file not found: {corpus}")
    if out.exists() and any(out.iterdir()) and not force:
        raise DemoCorpusError(f"{out} exists and is not empty: pass --force to rebuild it")
    with gzip.open(corpus, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    instructions = topic_instructions(records)
    params = {"seed": INSTRUCTIONS_SEED, "split": "train", "format": "prompt_response"}
    corpus_hash = sha256_file(corpus)
    recipe = {
        "stage": INSTRUCTIONS_STAGE,
        "version": INSTRUCTIONS_VERSION,
        "params": params,
        "inputs": {corpus.name: corpus_hash},
    }
    with atomic_dir(out, manifest=False) as tmp:
        write_jsonl_gz(tmp / "en.jsonl.gz", instructions)
        manifest = {
            "params": params,
            "corpus": {"file": corpus.name, "sha256": corpus_hash},
            "file": "en.jsonl.gz",
            "file_sha256": sha256_file(tmp / "en.jsonl.gz"),
            "examples": len(instructions),
            "per_topic": dict(sorted(Counter(r["topic"] for r in instructions).items())),
        }
        write_json(tmp / "manifest.json", manifest)
        (tmp / "NOTICE").write_text(
            "en.jsonl.gz is derived from the English LibreOffice help in ../libreoffice-help "
            "(see its NOTICE)\nand stays under the Mozilla Public License, v. 2.0: "
            "https://www.mozilla.org/MPL/2.0/.\n"
        )
        _seal(tmp, out, recipe)
    log.info("%s: %d topic instructions", out, len(instructions))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output directory of the corpus")
    parser.add_argument(
        "--instructions", type=Path, help="also write the topic instruction dataset here"
    )
    parser.add_argument(
        "--from-corpus",
        type=Path,
        help="build only the instructions, from this already built corpus directory",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="scratch for .debs and unpacked files "
        "(default: a temporary directory, removed afterwards)",
    )
    parser.add_argument("--debs", type=Path, help="directory of already downloaded .debs")
    parser.add_argument("--version", default=DEBIAN_VERSION, help="Debian package version")
    parser.add_argument("--langs", default=",".join(LANGS), help="comma-separated, with 'en'")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.out is None) == (args.from_corpus is None):
        parser.error("give --out (build the corpus) or --from-corpus (use a built one)")
    if args.from_corpus is not None and args.instructions is None:
        parser.error("--from-corpus goes with --instructions")
    if args.instructions is not None:  # fail before the download, not after
        out = args.instructions
        if out.exists() and any(out.iterdir()) and not args.force:
            raise DemoCorpusError(f"{out} exists and is not empty: pass --force to rebuild it")
    langs = tuple(lang.strip() for lang in args.langs.split(",") if lang.strip())
    if args.out is not None and args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        build(args.out, args.workdir, args.debs, args.version, langs, args.force)
    elif args.out is not None:
        with tempfile.TemporaryDirectory(prefix="demo-corpus-") as workdir:
            build(args.out, Path(workdir), args.debs, args.version, langs, args.force)
    if args.instructions is not None:
        corpus = (args.from_corpus or args.out) / f"{ENGLISH}.jsonl.gz"
        write_instructions(corpus, args.instructions, args.force)


if __name__ == "__main__":
    main()
