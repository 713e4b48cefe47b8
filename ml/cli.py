"""The tagger's commands: train, finetune, fisher, evaluate, predict, export, bulk. ``python -m ml`` runs them with torch
alone; the ``ner`` command (``service.cli``) adds serve and db to the same parser."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

DEFAULT_MODEL_HELP = "model folder (default: $NER_MODEL, else the bundled models/en-conll03)"


def _default_model(path: str | None) -> Path:
    import os

    from ml.artifact import default_model_path

    return Path(path or os.environ.get("NER_MODEL") or default_model_path())


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from ml.config import Config
    from ml.data import read_corpus
    from ml.train import data_fingerprint, train

    config = Config.load(args.config) if args.config else Config()
    if args.set:
        config = config.override(args.set)
    if args.data:
        folder = Path(args.data)
        train_path, dev_path = folder / "train.txt", folder / "dev.txt"
    else:
        train_path, dev_path = args.train, args.dev
    if not train_path or not dev_path:
        return _fail("give --data FOLDER (with train.txt and dev.txt) or both --train and --dev")
    train_data = read_corpus(train_path, language=config.language)
    dev_data = read_corpus(dev_path, language=config.language)
    lineage: dict = {"train": str(train_path), "dev": str(dev_path), "config": str(args.config) if args.config else None}
    feedback = []
    for path in args.feedback or []:
        feedback.extend(read_corpus(path, fmt="jsonl", language=config.language))
    if feedback:
        weight = config.train.feedback_weight
        train_data = list(train_data) + feedback * weight
        lineage.update(
            feedback_files=[str(p) for p in args.feedback],
            feedback_sentences=len(feedback),
            feedback_weight=weight,
            feedback_fingerprint=data_fingerprint(feedback),
        )
    lineage.update(args.lineage or {})
    if args.base_model:
        lineage["base_model"] = args.base_model
    out = Path(args.out) if args.out else Path("runs") / f"{args.name}-{args.version}"
    result = train(config, train_data, dev_data, out, args.name, args.version, lineage, progress=not args.quiet)
    print(json.dumps({"model": str(out), "dev_f1": result.dev.f1, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1)}))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ml.finetune import FinetuneConfig, FinetuneInputs, finetune, read_corrections

    config = FinetuneConfig().override(args.set or [])
    corrections = []
    for path in args.corrections or []:
        corrections.extend(read_corrections(path))
    if not corrections:
        return _fail("give the corrections: --corrections FILE.jsonl (GET /annotations?format=jsonl) or --annotations-from DATABASE_URL")
    base_data = None
    lineage: dict = dict(args.lineage or {})
    if args.data:
        from ml.data import read_corpus

        folder = Path(args.data)
        base_data = (read_corpus(folder / "train.txt"), read_corpus(folder / "dev.txt"))
        lineage["base_corpus"] = str(folder)
    stored: list[str] = []
    for path in args.rehearse or []:
        path = Path(path)
        stored.extend(_read_texts(path, "jsonl" if path.suffix in (".jsonl", ".json") else "text"))
    base = _default_model(args.from_model)
    out = Path(args.out) if args.out else Path("runs") / f"{args.name or 'model'}-{args.version}"

    def report(fraction: float, message: str) -> None:
        if not args.quiet:
            print(f"[{100 * fraction:3.0f}%] {message}", file=sys.stderr, flush=True)

    inputs = FinetuneInputs(base, corrections, args.version, out, args.name, base_data, stored, lineage=lineage)
    result = finetune(inputs, config, progress=report)
    held = result.metrics["heldout"] or {}
    summary = {
        "model": str(out),
        "heldout_documents": held.get("documents", 0),
        "heldout_f1_before": held["before"]["f1"] if held else None,
        "heldout_f1_after": held["after"]["f1"] if held else None,
        "seconds": result.metrics["train_seconds"],
    }
    if "dev" in result.metrics:
        summary.update(dev_f1_before=result.metrics["dev_before"]["f1"], dev_f1_after=result.metrics["dev"]["f1"])
    print(json.dumps(summary))
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    """Measure the base model's Fisher diagonal on its training corpus and store it in its folder."""
    from ml.anchoring import fisher_information, save_fisher
    from ml.artifact import load_model
    from ml.data import read_corpus

    folder = _default_model(args.model)
    loaded = load_model(folder)
    sentences = [s for path in args.data for s in read_corpus(path)]

    def report(done: int, total: int) -> None:
        print(f"{done}/{total} sentences", file=sys.stderr, flush=True)

    mc = loaded.config.model
    fisher = fisher_information(loaded.model, loaded.vocab, sentences, mc.max_word_length, mc.tag_scheme, args.max_sentences, progress=report)
    path = save_fisher(folder, fisher)
    print(json.dumps({"fisher": str(path), "corpus_sentences": fisher.sentences, "measured_on": fisher.sample}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ml.data import read_corpus
    from ml.predictor import Predictor, evaluate

    predictor = Predictor.load(_default_model(args.model), args.device)
    language = predictor.loaded.meta.language if predictor.loaded else "en"
    sentences = read_corpus(args.data, fmt=args.format, scheme=args.scheme, language=language)
    scores = evaluate(predictor, sentences, args.batch_size)
    if args.json:
        payload = scores.to_dict()
        if predictor.loaded is not None:
            payload["model"] = {"name": predictor.loaded.meta.name, "version": predictor.loaded.meta.version, "path": str(predictor.loaded.path)}
        payload["data"] = str(args.data)
        print(json.dumps(payload, indent=2))
    else:
        print(f"{'type':8s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'support':>8s}")
        for label, s in scores.per_type.items():
            print(f"{label:8s} {100 * s['precision']:9.2f} {100 * s['recall']:7.2f} {100 * s['f1']:7.2f} {s['support']:8d}")
        print(f"{'overall':8s} {100 * scores.precision:9.2f} {100 * scores.recall:7.2f} {100 * scores.f1:7.2f} {scores.gold:8d}")
        print(f"{scores.sentences} sentences, {scores.tokens} tokens, token accuracy {100 * scores.token_accuracy:.2f}")
    return 0


def _sniff_format(path: Path) -> str:
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix in (".conll", ".iob", ".bio"):
        return "conll"
    from ml.labels import TagError, split_tag

    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                continue
            if len(cols) in (2, 4):
                try:
                    split_tag(cols[-1])
                    return "conll"
                except TagError:
                    pass
            return "text"
    return "text"


def _read_texts(path: Path, fmt: str) -> list[str]:
    """The documents of a plain-text file (one per non-empty line) or a JSONL file (its texts)."""
    from ml.data import DataFormatError
    from ml.data.jsonl import parse_record

    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if fmt == "text":
                texts.append(line.rstrip("\n"))
                continue
            try:
                texts.append(parse_record(json.loads(line))[0])
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise DataFormatError(path, number, str(e)) from None
    return texts


def _rules_and_filter(args: argparse.Namespace, model_labels: list[str]):
    """``--rules FILE`` as a rule set (labels: any; the file is the user's) and the entity filter of
    ``--min-score`` / ``--labels`` (labels the model or the rules produce). Raises ValueError
    naming the bad line or label."""
    from ml.rules import EntityFilter, RuleError, RuleSet, read_rules_file

    rules = None
    if args.rules:
        try:
            rules = RuleSet(read_rules_file(args.rules), args.rules_mode)
        except RuleError as e:
            raise ValueError(f"{args.rules}: {e}") from None
    known = list(model_labels) + sorted({r.label for r in (rules.rules if rules else [])} - set(model_labels))
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels is not None else None
    return rules, EntityFilter.of(args.min_score, labels, known)


def _predict_conll(args: argparse.Namespace, predictor, rules, keep) -> list:
    from ml.data import Sentence
    from ml.data.conll import read_conll
    from ml.labels import Span
    from ml.rules import Found, merge

    sentences = read_conll(args.input)
    results = predictor.predict([s.tokens for s in sentences])
    tagged = []
    for s, r in zip(sentences, results, strict=True):
        found = [Found(p.start, p.end, p.label, p.score) for p in r.spans]
        if rules is not None:
            found = merge(found, rules.match(s.tokens), rules.mode).entities
        tagged.append(Sentence(s.tokens, [Span(f.start, f.end, f.label) for f in found if keep.keep(f.label, f.score)], doc_id=s.doc_id))
    return tagged


def cmd_predict(args: argparse.Namespace) -> int:
    from ml.pipeline import TextTagger, entity_dicts
    from ml.predictor import Predictor

    predictor = Predictor.load(_default_model(args.model), args.device)
    try:
        rules, keep = _rules_and_filter(args, predictor.labels)
    except ValueError as e:
        return _fail(str(e))
    # read and check the whole input before creating the output file
    fmt = "text" if args.text is not None else (args.format if args.format != "auto" else _sniff_format(Path(args.input)))
    if fmt == "conll":
        from ml.data.conll import write_conll

        tagged = _predict_conll(args, predictor, rules, keep)
    else:
        texts = [args.text] if args.text is not None else _read_texts(Path(args.input), fmt)
        lines = [
            json.dumps({"text": text, "entities": entity_dicts(result, keep)}, ensure_ascii=False) + "\n"
            for text, result in zip(texts, TextTagger(predictor).tag(texts, rules=rules), strict=True)
        ]
    with (open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext(sys.stdout)) as out:
        if fmt == "conll":
            write_conll(tagged, out)
        else:
            out.writelines(lines)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ml.export import export_torchscript

    path = export_torchscript(_default_model(args.model), args.out)
    print(f"wrote {path}")
    return 0


def _score(value: str) -> float:
    try:
        score = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= score <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {value}")
    return score


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """--min-score, --labels and --rules/--rules-mode (ml.rules), for predict and bulk."""
    p.add_argument("--min-score", type=_score, default=None, help="leave out entities scoring lower (0 to 1; a rule's entity scores 1)")
    p.add_argument("--labels", help="comma-separated labels to keep (default: all)")
    p.add_argument("--rules", metavar="FILE", help="entity rules applied after the model: JSONL, or CSV when it ends in .csv (docs/rules.md)")
    p.add_argument("--rules-mode", choices=["override", "fill"], default="override", help="override: a rule match replaces overlapping model entities; fill: only where the model found nothing")


class Commands:
    """The ``ner`` parser and its subcommands: what a program built on this one (service.cli) uses
    to add options to a subcommand (``command``) or to add subcommands (``add``)."""

    def __init__(self, parser: argparse.ArgumentParser, subcommands: argparse._SubParsersAction) -> None:
        self.parser = parser
        self._subcommands = subcommands

    def command(self, name: str) -> argparse.ArgumentParser:
        """The parser of subcommand ``name``; KeyError names a missing one."""
        try:
            return self._subcommands.choices[name]
        except KeyError:
            raise KeyError(f"no subcommand {name!r}; there are: {', '.join(self._subcommands.choices)}") from None

    def add(self, name: str, **kwargs) -> argparse.ArgumentParser:
        """A new subcommand (``add_parser``'s arguments: help=...)."""
        return self._subcommands.add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    return build_commands().parser


def build_commands() -> Commands:
    """Every subcommand of ml's ``ner``, for ``build_parser`` and for programs that extend it."""
    parser = argparse.ArgumentParser(prog="ner", description="Named-entity recognition with a bidirectional recurrent tagger.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model folder from CoNLL/JSONL data")
    p.add_argument("--config", help="TOML config with [model] and [train] tables (default: built-in defaults)")
    p.add_argument("--data", help="folder holding train.txt and dev.txt (CoNLL)")
    p.add_argument("--train", help="training file (CoNLL or .jsonl)")
    p.add_argument("--dev", help="development file for model selection (CoNLL or .jsonl)")
    p.add_argument("--out", help="model folder to write (default: runs/NAME-VERSION)")
    p.add_argument("--name", default="model")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value, e.g. --set train.epochs=3")
    p.add_argument("--feedback", action="append", metavar="FILE.jsonl", help="corrections (JSONL) added to the training data, train.feedback_weight times")
    p.add_argument("--base-model", help="recorded in the new model's lineage")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, lineage=None)

    p = sub.add_parser("finetune", help="fine-tune an existing model folder on corrections into a new version (minutes)")
    p.add_argument("--from-model", help=DEFAULT_MODEL_HELP.replace("model folder", "base model folder"))
    p.add_argument("--corrections", action="append", metavar="FILE.jsonl", help="corrections as GET /annotations?format=jsonl exports them")
    p.add_argument("--data", help="the base corpus (folder with train.txt and dev.txt): mixed in, and dev F1 measured before and after")
    p.add_argument("--rehearse", action="append", metavar="FILE", help="stored texts nobody corrected (one a line, or JSONL): the forgetting probe, and rehearsal / distillation when on")
    p.add_argument("--out", help="model folder to write (default: runs/NAME-VERSION)")
    p.add_argument("--name", help="model name (default: the base model's)")
    p.add_argument("--version", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a fine-tuning setting, e.g. --set epochs=4 --set freeze=encoder (see ml/finetune.py)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_finetune, lineage=None)

    p = sub.add_parser("fisher", help="store the model's Fisher diagonal (measured on its training corpus) in its folder, for fine-tunes without the corpus")
    p.add_argument("--model", help=DEFAULT_MODEL_HELP)
    p.add_argument("--data", action="append", required=True, metavar="FILE", help="the corpus the model was trained on (repeatable: train and dev)")
    p.add_argument("--max-sentences", type=int, default=5000, help="measure on a seeded sample of this many sentences (0: all)")
    p.set_defaults(func=cmd_fisher)

    p = sub.add_parser("evaluate", help="entity-level precision/recall/F1 of a model on a file")
    p.add_argument("--model", help=DEFAULT_MODEL_HELP)
    p.add_argument("--data", required=True, help="CoNLL or JSONL file with gold entities")
    p.add_argument("--format", default="auto", choices=["auto", "conll", "jsonl"])
    p.add_argument("--scheme", default="auto", help="tag scheme of a CoNLL file: auto, iob1, iob2, bioes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="tag a text, or a text/JSONL/CoNLL file")
    p.add_argument("--model", help=DEFAULT_MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text to tag")
    src.add_argument("--input", help="file: plain text (one document a line), JSONL (text field) or CoNLL")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "conll"])
    p.add_argument("--output", help="write here instead of standard output (JSONL, or CoNLL for CoNLL input)")
    p.add_argument("--device", default="cpu")
    add_filter_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a TorchScript archive of the whole inference path")
    p.add_argument("--model", help=DEFAULT_MODEL_HELP)
    p.add_argument("--out", required=True, help="archive to write (.pt)")
    p.set_defaults(func=cmd_export)

    from ml.bulk.command import add_bulk_parser

    add_bulk_parser(sub, DEFAULT_MODEL_HELP)
    return Commands(parser, sub)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None, expected: tuple = ()) -> int:
    """Parse and dispatch; errors the user can fix print one line and exit 2, not a traceback."""
    from ml.artifact import ModelLoadError
    from ml.config import ConfigError
    from ml.data import DataFormatError
    from ml.device import DeviceError

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataFormatError, DeviceError, ModelLoadError, FileNotFoundError, *expected) as e:
        return _fail(str(e))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
