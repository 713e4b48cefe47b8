"""Entity rules at scale: what 100,000 phrase rules cost to load and what they add to /tag, in process.

    python benchmarks/rules.py                                # 100,000 rules, CoNLL dev sentences
    python benchmarks/rules.py --rules 2000 --sentences 50    # a quick check that it runs

Builds ``--rules`` synthetic gazetteer phrases (1 to 4 tokens; their first tokens are capitalised
words of the sentences, so the phrase index is hit at many positions, as a real gazetteer of names
would be), then measures:

* load: compiling the rules (``ml.rules.RuleSet``: every phrase through the service's tokenizer),
  and what a worker does when it picks up a new version (``service.serving.rules.load_newest``:
  reading the rule set from a SQLite database, then compiling it);
* the app built by ``service.main.create_app`` (SQLite, ``store: false``) through Starlette's
  TestClient: one sentence per POST /tag (p50 over ``--sentences`` sentences of 12-30 tokens) and
  batches of 64 texts per POST /tag (sentences/s), without and with the rules, alternating
  ``--rounds`` times in the same process (the engine's rule set is swapped between rounds).

Prints a Markdown table. Nothing here is a test: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "conll2003" / "dev.txt"
ADMIN_KEY = "benchmark-admin-key-0123456789"
SUFFIXES = ["Holdings", "Group", "Ltd", "GmbH", "Foundation", "Pro", "Institute", "Partners", "Labs", "Systems"]


def read_sentences(path: Path) -> list[str]:
    from ml.data import read_corpus

    return [" ".join(s.tokens) for s in read_corpus(path, fmt="conll")]


def synthetic_rules(n: int, sentences: list[str], seed: int = 0):
    """``n`` distinct phrase rules; first tokens drawn from the capitalised words of ``sentences``."""
    from ml.rules import Rule

    rng = random.Random(seed)
    words = sorted({w for s in sentences for w in s.split() if w[:1].isupper() and w.isalpha()}) or ["Acme"]
    labels = ["ORG", "PER", "LOC", "MISC"]
    seen: set[str] = set()
    rules: list[Rule] = []
    while len(rules) < n:
        size = rng.choice((1, 2, 2, 3, 3, 4))
        tokens = [rng.choice(words)] + [rng.choice(words) if rng.random() < 0.5 else f"{rng.choice(SUFFIXES)}{rng.randrange(1000)}" for _ in range(size - 1)]
        phrase = " ".join(tokens)
        if phrase.casefold() in seen:
            continue
        seen.add(phrase.casefold())
        rules.append(Rule(rng.choice(labels), phrase, case_sensitive=rng.random() < 0.3, id=len(rules) + 1))
    return rules


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def measure_load(rules, workdir: Path) -> dict[str, float]:
    """Compile time alone, and database read + compile as a worker does it."""
    from ml.rules import PhraseTokenizer, RuleSet
    from service.serving.rules import load_newest
    from service.store import rules as store
    from service.store.session import make_engine, make_sessionmaker, upgrade

    tokenize = PhraseTokenizer.for_language("en")
    tokenize("warm up")  # spaCy itself is loaded with the model, not with the rules
    _, compile_s = timed(lambda: RuleSet(rules, "override", None, PhraseTokenizer.for_language("en")))
    url = f"sqlite:///{workdir / 'rules.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        _, store_s = timed(lambda: store.create_version(session, parent=0, mode="override", action="import", author="benchmark", note=None, new=rules))
    with sessions() as session:
        loaded, load_s = timed(lambda: load_newest(session, "en"))
    engine.dispose()
    assert len(loaded) == len(rules)
    return {"compile_s": compile_s, "db_load_s": load_s, "store_s": store_s}


def one_sentence_p50(client, singles: list[str]) -> float:
    times = []
    for text in singles:
        started = time.perf_counter()
        r = client.post("/tag", json={"text": text, "store": False})
        times.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return statistics.median(times) * 1000


def batch_rate(client, sentences: list[str], batch: int) -> float:
    started = time.perf_counter()
    for lo in range(0, len(sentences), batch):
        r = client.post("/tag", json={"texts": sentences[lo : lo + batch], "store": False})
        assert r.status_code == 200, r.text
    return len(sentences) / (time.perf_counter() - started)


def measure_tag(args, rules, sentences: list[str], workdir: Path) -> dict[str, list[float]]:
    """Alternating rounds without / with the rules, in one app."""
    from fastapi.testclient import TestClient

    from ml.artifact import default_model_path
    from service.config import Settings
    from service.main import create_app
    from service.serving.rules import compile_rules, empty_rules

    settings = Settings(
        database_url=f"sqlite:///{workdir / 'tag.db'}", ner_model=args.model or default_model_path(), auto_migrate=True, model_poll_s=0,
        admin_key=ADMIN_KEY, allowed_hosts=["testserver"], _env_file=None,
    )
    singles = [s for s in sentences if 12 <= len(s.split()) <= 30][: args.sentences]
    batch_texts = sentences[: args.batch_sentences]
    out: dict[str, list[float]] = {"p50_without": [], "p50_with": [], "rate_without": [], "rate_with": []}
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.runtime.tagging  # type: ignore[attr-defined]
        with_rules = compile_rules(rules, "override", 1, engine.model.language)
        without = empty_rules()
        one_sentence_p50(client, singles[:20])  # warm-up
        for _ in range(args.rounds):
            for name, ruleset in (("without", without), ("with", with_rules)):
                engine.set_rules(ruleset)
                out[f"p50_{name}"].append(one_sentence_p50(client, singles))
                out[f"rate_{name}"].append(batch_rate(client, batch_texts, args.batch))
    return out


def change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f} %"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=100_000, help="phrase rules to build")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL file of sentences (default: CoNLL dev)")
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--sentences", type=int, default=300, help="sentences of 12-30 tokens timed one per request")
    parser.add_argument("--batch-sentences", type=int, default=2048, help="sentences sent in batches for the throughput")
    parser.add_argument("--batch", type=int, default=64, help="texts per request in the throughput run (at most MAX_BATCH_TEXTS)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds without / with the rules")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    sentences = read_sentences(args.data)
    rules = synthetic_rules(args.rules, sentences)
    with tempfile.TemporaryDirectory(prefix="ner-rules-bench-") as tmp:
        load = measure_load(rules, Path(tmp))
        tag = measure_tag(args, rules, sentences, Path(tmp))

    p50_a, p50_b = statistics.median(tag["p50_without"]), statistics.median(tag["p50_with"])
    rate_a, rate_b = statistics.median(tag["rate_without"]), statistics.median(tag["rate_with"])
    print(f"\n{len(rules):,} phrase rules; {args.sentences} one-sentence requests and {args.batch_sentences} sentences in batches of {args.batch} "
          f"({args.data.name}); median of {args.rounds} alternating rounds; in process (TestClient), store: false\n")
    print("| measure | without rules | with rules | change |")
    print("|---|---|---|---|")
    print(f"| compile {len(rules):,} phrase rules (s) | | {load['compile_s']:.2f} | |")
    print(f"| a worker picks up the version: database read + compile (s) | | {load['db_load_s']:.2f} | |")
    print(f"| store the version (import into SQLite, s) | | {load['store_s']:.2f} | |")
    print(f"| POST /tag, one sentence, p50 (ms) | {p50_a:.2f} | {p50_b:.2f} | {change(p50_a, p50_b)} |")
    print(f"| POST /tag, batches of {args.batch}, sentences/s | {rate_a:,.0f} | {rate_b:,.0f} | {change(rate_a, rate_b)} |")


if __name__ == "__main__":
    main()
