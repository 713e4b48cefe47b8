"""The tagger's commands: train, evaluate, predict, export, bulk. ``python -m ml`` runs them with torch
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
    from ml.finetune import FinetuneConfig, finetune, read_corrections

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
    rehearsal: list[str] = []
    for path in args.rehearse or []:
        path = Path(path)
        rehearsal.extend(_read_texts(path, "jsonl" if path.suffix in (".jsonl", ".json") else "text"))
    base = _default_model(args.from_model)
    out = Path(args.out) if args.out else Path("runs") / f"{args.name or 'model'}-{args.version}"

    def report(fraction: float, message: str) -> None:
        if not args.quiet:
            print(f"[{100 * fraction:3.0f}%] {message}", file=sys.stderr, flush=True)

    result = finetune(base, corrections, out, args.version, config, args.name, base_data, rehearsal, lineage, progress=report)
    held = result.metrics["heldout"]
    summary = {
        "model": str(out),
        "heldout_documents": held["documents"],
        "heldout_f1_before": held["before"]["f1"] if held["before"] else None,
        "heldout_f1_after": held["after"]["f1"] if held["after"] else None,
        "seconds": result.metrics["train_seconds"],
    }
    if "dev" in result.metrics:
        summary.update(dev_f1_before=result.metrics["dev_before"]["f1"], dev_f1_after=result.metrics["dev"]["f1"])
    print(json.dumps(summary))
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


def cmd_predict(args: argparse.Namespace) -> int:
    from ml.pipeline import TextTagger
    from ml.predictor import Predictor

    predictor = Predictor.load(_default_model(args.model), args.device)
    # read and check the whole input before creating the output file
    fmt = "text" if args.text is not None else (args.format if args.format != "auto" else _sniff_format(Path(args.input)))
    if fmt == "conll":
        from ml.data import Sentence
        from ml.data.conll import read_conll, write_conll
        from ml.labels import Span

        sentences = read_conll(args.input)
        results = predictor.predict([s.tokens for s in sentences])
        tagged = [Sentence(s.tokens, [Span(p.start, p.end, p.label) for p in r.spans], doc_id=s.doc_id) for s, r in zip(sentences, results, strict=True)]
    else:
        texts = [args.text] if args.text is not None else _read_texts(Path(args.input), fmt)
        lines = [
            json.dumps({"text": text, "entities": [e.__dict__ for e in result.entities]}, ensure_ascii=False) + "\n"
            for text, result in zip(texts, TextTagger(predictor).tag(texts), strict=True)
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


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--rehearse", action="append", metavar="FILE", help="unlabelled texts (one a line, or JSONL) tagged by the base model for pseudo-rehearsal")
    p.add_argument("--out", help="model folder to write (default: runs/NAME-VERSION)")
    p.add_argument("--name", help="model name (default: the base model's)")
    p.add_argument("--version", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a fine-tuning setting, e.g. --set epochs=4 --set freeze=encoder (see ml/finetune.py)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_finetune, lineage=None)

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
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a TorchScript archive of the whole inference path")
    p.add_argument("--model", help=DEFAULT_MODEL_HELP)
    p.add_argument("--out", required=True, help="archive to write (.pt)")
    p.set_defaults(func=cmd_export)

    from ml.bulk.command import add_bulk_parser

    add_bulk_parser(sub, DEFAULT_MODEL_HELP)
    return parser


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
