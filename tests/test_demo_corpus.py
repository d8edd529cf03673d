"""The demo corpus builder (synthetic pages and .debs) and the committed data/libreoffice-help."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from workflow.artifacts import read_json, sha256_file
from workflow.corpus import read_corpus
from workflow.demo_corpus import (
    LANGS,
    TARGETS,
    DemoCorpusError,
    build_records,
    extract_paragraphs,
    main,
    page_split,
    page_topic,
    read_pages,
    topic_instructions,
)
from workflow.instructions import load_conversations
from workflow.prompts import TOPICS, topic_example

DATA = Path(__file__).resolve().parents[1] / "data" / "libreoffice-help"
INSTRUCTIONS = DATA.parent / "topic-instructions"

LONG_EN = "This sentence is long enough to pass the forty character filter."
LONG_EU = "Esaldi hau nahikoa luzea da berrogei karaktereko iragazkia gainditzeko."


def page(lang: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="utf-8"><title>t</title>'
        f'</head><body><div id="DisplayArea">{body}</div></body></html>'
    )


# --------------------------------------------------------------------------- extraction


def test_extract_paragraphs_keeps_id_elements_text_only() -> None:
    html = page(
        "en-US",
        """
        <h1 id="hd_id1" dir="auto">Database   Functions</h1>
        <p class="paragraph">No id: ignored.</p>
        <p id="bm_id9">Wrong id prefix: ignored.</p>
        <p id="par_id2" class="paragraph"><a name="x"></a>Use <span class="emph">SUM</span>
           &amp; <a href="y.html">AVERAGE</a><br>here<img src="i.svg" alt="Icon">.</p>
        <table><tr><td><p id="par_id3">In a cell</p></td></tr></table>
        <ul><li id="par_id4">Item <sup>2</sup></li></ul>
        <p id="par_id5">Choose <span class="switchinline">
          <span hidden="true" id="MACtextshared_1" class="MAC">LibreOffice - Preferences</span>
          <span hidden="true" id="defaulttextshared_1">Tools - Options</span>
        </span> - Paths.</p>
        <p id="par_id6">Only <span class="switchinline"><span hidden="true" id="CALCx" class="CALC">
          Calc</span><span hidden="true" id="WRITERx" class="WRITER">Writer</span></span> case.</p>
        <p id="par_id7">Visible<span hidden="true">hidden words</span> end.</p>
    """,
    )
    assert extract_paragraphs(html) == [
        ("hd_id1", "Database Functions"),
        ("par_id2", "Use SUM & AVERAGE here."),
        ("par_id3", "In a cell"),
        ("par_id4", "Item 2"),
        ("par_id5", "Choose Tools - Options - Paths."),
        ("par_id6", "Only Calc case."),
        ("par_id7", "Visible end."),
    ]


def test_topic_and_split_by_page() -> None:
    assert page_topic("scalc/01/04060101.html") == "scalc"
    assert page_topic("other/01/x.html") is None
    assert page_topic("scalc") is None
    pages = [f"shared/01/{number}.html" for number in range(4000)]
    test_share = sum(page_split(name) == "test" for name in pages) / len(pages)
    assert 0.10 < test_share < 0.14
    assert all(page_split(name) == page_split(name) for name in pages[:50])
    assert page_split(pages[0], test_fraction=0.0) == "train"
    assert page_split(pages[0], test_fraction=1.0) == "test"


def write_page(root: Path, lang: str, name: str, body: str) -> None:
    path = root / lang / "text" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(lang, body), encoding="utf-8")


def synthetic_help(root: Path) -> None:
    """An English and a Basque help tree: one page per case the filter must handle."""
    english = f"""
        <h1 id="hd_id1">Short title</h1>
        <p id="par_id1">{LONG_EN}</p>
        <p id="par_id2">This paragraph was never translated into Basque at all.</p>
        <p id="par_id3">HARMEAN(Number 1 [; Number 2 [; … [; Number 255]]])</p>
        <p id="par_id4">A second long English paragraph, translated with a repeat.</p>
        <p id="par_id5">A third long English paragraph whose translation repeats.</p>
        <p id="par_id6">Embedded: an id that occurs twice on this page, first copy.</p>
        <p id="par_id6">Embedded: an id that occurs twice on this page, other copy.</p>
    """
    basque = f"""
        <h1 id="hd_id1">Izenburu laburra</h1>
        <p id="par_id1">{LONG_EU}</p>
        <p id="par_id2">This paragraph was never translated into Basque at all.</p>
        <p id="par_id3">HARMEAN( Number 1 [; Number 2 [; … [; Number 255]]])</p>
        <p id="par_id4">Paragrafo luze bat, bi aldiz agertzen den itzulpenarekin.</p>
        <p id="par_id5">Paragrafo luze bat, bi aldiz agertzen den itzulpenarekin.</p>
        <p id="par_id6">Embedded: an id that occurs twice on this page, other copy.</p>
        <p id="par_id6">Txertatua: orri honetan bi aldiz agertzen den identifikatzailea.</p>
        <p id="par_id99">Paragrafo honek ez du ingelesezko jatorrizkorik orri honetan.</p>
    """
    for lang, body in (("en-US", english), ("eu", basque)):
        write_page(root, lang, "scalc/01/page.html", body)
        write_page(root, lang, "unknown/page.html", body)  # not a topic: dropped


def test_build_records_keeps_translated_long_unique_paragraphs(tmp_path: Path) -> None:
    synthetic_help(tmp_path)
    english = read_pages(tmp_path / "en-US" / "text")
    basque = read_pages(tmp_path / "eu" / "text")
    assert set(english) == {"scalc/01/page.html", "unknown/page.html"}

    records, stats = build_records(basque, english)
    split = page_split("scalc/01/page.html")
    assert records == [
        {
            "id": "scalc/01/page.html#par_id1",
            "page": "scalc/01/page.html",
            "topic": "scalc",
            "split": split,
            "text": LONG_EU,
        },
        {
            "id": "scalc/01/page.html#par_id4",
            "page": "scalc/01/page.html",
            "topic": "scalc",
            "split": split,
            "text": "Paragrafo luze bat, bi aldiz agertzen den itzulpenarekin.",
        },
        # The first copy of par_id6 equals an English copy of the same id: the second counts.
        {
            "id": "scalc/01/page.html#par_id6",
            "page": "scalc/01/page.html",
            "topic": "scalc",
            "split": split,
            "text": "Txertatua: orri honetan bi aldiz agertzen den identifikatzailea.",
        },
    ]
    assert (stats.paragraphs, stats.untranslated, stats.no_english) == (8, 2, 1)
    assert (stats.short, stats.duplicate) == (1, 1)

    english_records, english_stats = build_records(english, None)
    assert [record["id"].split("#")[1] for record in english_records] == [
        "par_id1",
        "par_id2",
        "par_id3",
        "par_id4",
        "par_id5",
        "par_id6",
    ]
    assert english_stats.short == 1 and english_stats.untranslated == 0


# --------------------------------------------------------------------------- the CLI on .debs


def make_deb(root: Path, out_dir: Path, package: str, version: str, help_dir: str) -> None:
    tree = root / package
    shutil.copytree(root / "trees" / help_dir, tree / "usr/share/libreoffice/help" / help_dir)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: synthetic help\n"
    )
    subprocess.run(
        [
            "dpkg-deb",
            "--root-owner-group",
            "-Zgzip",
            "--build",
            str(tree),
            str(out_dir / f"{package}_{version}_all.deb"),
        ],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_cli_builds_reproducible_corpus_from_debs(tmp_path: Path) -> None:
    synthetic_help(tmp_path / "trees")
    debs = tmp_path / "debs"
    debs.mkdir()
    make_deb(tmp_path, debs, "libreoffice-help-en-us", "1:1.0-1", "en-US")
    make_deb(tmp_path, debs, "libreoffice-help-eu", "1:1.0-1", "eu")
    out = tmp_path / "out"
    args = [
        "--out",
        str(out),
        "--debs",
        str(debs),
        "--version",
        "1:1.0-1",
        "--langs",
        "en,eu",
        "--workdir",
        str(tmp_path / "work"),
    ]
    main(args)

    assert sorted(p.name for p in out.iterdir()) == [
        "NOTICE",
        "en.jsonl.gz",
        "eu.jsonl.gz",
        "manifest.json",
        "recipe.json",
    ]
    raw = (out / "eu.jsonl.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    lines = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines()]
    assert [line["text"] for line in lines][0] == LONG_EU
    manifest = read_json(out / "manifest.json")["languages"]
    assert manifest["eu"]["paragraphs"] == 3 and manifest["en"]["paragraphs"] == 6
    assert manifest["eu"]["version"] == "1:1.0-1"
    assert manifest["eu"]["deb_sha256"] == sha256_file(debs / "libreoffice-help-eu_1:1.0-1_all.deb")
    assert manifest["eu"]["per_topic"] == {"scalc": 3}
    assert "Mozilla Public License" in (out / "NOTICE").read_text()

    with pytest.raises(DemoCorpusError, match="--force"):
        main(args)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    main([*args, "--force"])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before

    with pytest.raises(DemoCorpusError, match="libreoffice-help-en-us .deb at version 9:9"):
        main([*args, "--force", "--version", "9:9"])

    # The demo's SFT data: written with the corpus, or later from it, byte for byte the same.
    main([*args, "--force", "--instructions", str(tmp_path / "sft")])
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == [
        "NOTICE", "en.jsonl.gz", "manifest.json", "recipe.json"]
    first = (tmp_path / "sft" / "en.jsonl.gz").read_bytes()
    main(["--instructions", str(tmp_path / "again"), "--from-corpus", str(out)])
    assert (tmp_path / "again" / "en.jsonl.gz").read_bytes() == first
    with pytest.raises(DemoCorpusError, match="--force"):
        main(["--instructions", str(tmp_path / "again"), "--from-corpus", str(out)])
    records = [json.loads(line) for line in gzip.decompress(first).decode().splitlines()]
    english = [json.loads(line) for line in gzip.decompress(
        (out / "en.jsonl.gz").read_bytes()).decode().splitlines()]
    assert len(records) == sum(record["split"] == "train" for record in english)


# --------------------------------------------------------------------------- committed data


def raw_records(lang: str) -> list[dict]:
    with gzip.open(DATA / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def committed() -> dict[str, list[dict]]:
    return {lang: raw_records(lang) for lang in LANGS}


def test_committed_files_load_with_read_corpus() -> None:
    manifest = read_json(DATA / "manifest.json")["languages"]
    for lang in LANGS:
        records = read_corpus(DATA / f"{lang}.jsonl.gz")
        assert len(records) == manifest[lang]["paragraphs"]
        assert {record["split"] for record in records} == {"train", "test"}
        assert {record["topic"] for record in records} <= set(TOPICS)
        assert all(len(record["text"]) > 40 for record in records)
        texts = [record["text"] for record in records]
        assert len(set(texts)) == len(texts)


def test_committed_splits_agree_by_page(committed: dict[str, list[dict]]) -> None:
    def pages(lang: str, split: str) -> set[str]:
        return {record["page"] for record in committed[lang] if record["split"] == split}

    for lang in LANGS:
        assert not pages(lang, "test") & pages(lang, "train")
        assert all(record["split"] == page_split(record["page"]) for record in committed[lang])
        assert all(record["topic"] == page_topic(record["page"]) for record in committed[lang])
        assert all(record["id"].startswith(record["page"] + "#") for record in committed[lang])
        assert len({record["id"] for record in committed[lang]}) == len(committed[lang])
    for lang in TARGETS:
        assert not pages(lang, "test") & pages("en", "train")
    assert pages("eu", "test") <= pages("en", "test")


def test_committed_targets_are_translations(committed: dict[str, list[dict]]) -> None:
    english = {record["id"]: record["text"] for record in committed["en"]}
    english_texts = set(english.values())
    for lang in TARGETS:
        shared = [record for record in committed[lang] if record["id"] in english]
        assert len(shared) > 0.5 * len(committed[lang])
        assert all(record["text"] != english[record["id"]] for record in shared)
        # Almost no target paragraph is an English paragraph from elsewhere either.
        assert not any(record["text"] in english_texts for record in committed[lang])


def test_committed_sizes_are_plausible(committed: dict[str, list[dict]]) -> None:
    counts = {lang: len(records) for lang, records in committed.items()}
    assert counts["eu"] > 20_000
    assert 12_000 < counts["ca"] < 25_000
    assert 8_000 < counts["gl"] < 16_000
    assert counts["gl"] < counts["ca"] < counts["eu"]  # Galician is the least translated
    for lang, records in committed.items():
        test_share = sum(record["split"] == "test" for record in records) / len(records)
        assert 0.06 < test_share < 0.2, lang
    total = sum(path.stat().st_size for path in DATA.iterdir())
    assert total < 15_000_000


# --------------------------------------------------------------------------- SFT data


def test_topic_instructions_are_balanced_in_file_order() -> None:
    records = [{"id": f"t{i}", "text": f"t{i}", "split": "train", "topic": "scalc"}
               for i in range(50)]
    records += [{"id": f"w{i}", "text": f"w{i}", "split": "train", "topic": "swriter"}
                for i in range(3)]
    records += [{"id": "h", "text": "held out", "split": "test", "topic": "sdraw"}]
    ordered = topic_instructions(records, seed=7)
    assert len(ordered) == 53  # every training paragraph, none held out
    first = [record["topic"] for record in ordered[:20]]
    assert first.count("swriter") == 3 and first.count("scalc") == 17  # all swriter has
    assert [record["topic"] for record in ordered[:6]] == ["scalc", "swriter"] * 3
    assert ordered == topic_instructions(records, seed=7) != topic_instructions(records, seed=8)
    assert ordered[0] == {"id": ordered[0]["id"], "topic": "scalc",
                          **topic_example(ordered[0]["id"], "scalc")}
    with pytest.raises(ValueError, match="'smurf'"):
        topic_instructions([{"id": "x", "text": "x", "split": "train", "topic": "smurf"}])


def test_committed_instructions_match_the_corpus_and_load_as_sft_data() -> None:
    manifest = read_json(INSTRUCTIONS / "manifest.json")
    assert manifest["corpus"]["sha256"] == sha256_file(DATA / "en.jsonl.gz")
    assert manifest["file_sha256"] == sha256_file(INSTRUCTIONS / "en.jsonl.gz")
    english = {r["id"]: r for r in raw_records("en")}
    with gzip.open(INSTRUCTIONS / "en.jsonl.gz", "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert manifest["examples"] == len(records) == sum(
        r["split"] == "train" for r in english.values())
    for record in records[:500]:
        source = english[record["id"]]
        assert {k: record[k] for k in ("prompt", "response")} == topic_example(
            source["text"], source["topic"])
    # Balanced at the front: 2000 (the default sft.examples) are 9 topics x 222 or so.
    counts = Counter(record["topic"] for record in records[:2000])
    assert set(counts) == set(TOPICS) and max(counts.values()) - min(counts.values()) <= 1
    spec = {"path": str(INSTRUCTIONS / "en.jsonl.gz"), "hub": None, "format": "auto",
            "prompt_field": "prompt", "response_field": "response",
            "messages_field": "messages", "separator": ""}
    conversations, _ = load_conversations(spec, INSTRUCTIONS / "en.jsonl.gz", 3, "first", 0)
    assert conversations[0][1] == {"role": "assistant", "content": records[0]["response"]}
