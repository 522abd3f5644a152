"""``peft-rs``: inspect, convert, merge and combine PEFT adapter files, and fine-tune a classifier
(``finetune``, in :mod:`peft_rs.finetune`), from the command line.

Every subcommand prints ``peft-rs: error: <one line>`` on stderr and exits with status 2 for bad
arguments or files; progress bars are drawn only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO

import numpy as np

import peft_rs

PROG = "peft-rs"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MODEL_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Progress bar (bytes/s and ETA), drawn only on a terminal.


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """``progress(done_bytes, total_bytes)`` callback that draws a bar on ``stream`` (stderr)."""

    WIDTH = 24

    def __init__(self, label: str, total: int = 0, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total)

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        # At most ~10 redraws a second, but always the final state.
        if not self.enabled or (now - self.last_draw < 0.1 and done < self.total):
            return
        self.last_draw = now
        # "\x1b[K" clears what a longer previous line left behind.
        self.stream.write("\r" + self.line(done, now - self.start) + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def line(self, done: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = min(done / self.total, 1.0) if self.total else 0.0
        filled = int(frac * self.WIDTH)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        return (
            f"{self.label} {frac:4.0%} [{'#' * filled}{' ' * (self.WIDTH - filled)}] "
            f"{format_bytes(done)}/{format_bytes(self.total)} {format_bytes(rate)}/s ETA {format_eta(eta)}"
        )

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# ---------------------------------------------------------------------------------------------
# Tensor listings read from file headers (names, dtypes, shapes; no tensor data is loaded).

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
DTYPE_SIZES["BOOL"] = 1
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_NAMES |= {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
CLI_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # merge_checkpoint's dtype
# torch.save's storage classes.
TORCH_STORAGES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # byte range in a safetensors file's data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """The tensors of a safetensors file, its metadata and the offset of its data section;
    raises ``ValueError`` naming the file for a truncated or malformed file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path}: truncated or not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed header entry for {name!r}") from None
        if end > data_len:
            raise ValueError(
                f"{path}: truncated: {name!r} ends at byte {end} of a {data_len}-byte data section"
            )
        info = TensorInfo(dtype, shape, (begin, end))
        if dtype in DTYPE_SIZES and end - begin != info.numel * DTYPE_SIZES[dtype]:
            raise ValueError(f"{path}: {name!r} holds {end - begin} bytes for shape {list(shape)} {dtype}")
        tensors[name] = info
    return tensors, metadata, 8 + header_len


class _ListingUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` state dict's structure only: tensors become ``TensorInfo``. Only the
    few globals a state dict uses are allowed, so no code from the file is ever run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in TORCH_STORAGES:
            return TORCH_STORAGES[name]
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a state dict")

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage_type, key, location, numel)
        return pid[1]


def _rebuild_tensor(dtype: str, _offset: int, size: Sequence[int], *_rest: Any) -> TensorInfo:
    return TensorInfo(dtype, tuple(size))


def read_pickle_listing(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a ``torch.save`` zip file (PEFT's ``adapter_model.bin``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise ValueError(f"{path}: no data.pkl in the archive")
            state = _ListingUnpickler(archive.open(pkl)).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a readable torch.save file: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, TensorInfo) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def weights_file(adapter_dir: Path) -> Path:
    """The weights file PEFT would load (safetensors preferred)."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise CliError(f"{adapter_dir}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def read_listing(path: Path) -> dict[str, TensorInfo]:
    if path.name.endswith(".safetensors"):
        return read_safetensors_header(path)[0]
    return read_pickle_listing(path)


# ---------------------------------------------------------------------------------------------
# inspect


def _split_param(rel: str, names: Sequence[str]) -> tuple[str, str] | None:
    for name in sorted(names, key=len, reverse=True):
        if rel.endswith("." + name) and len(rel) > len(name) + 1:
            return rel[: -len(name) - 1], name
    return None


def _is_module_to_save(modules_to_save: Sequence[str] | None, rel: str) -> bool:
    prefixes = [rel[:i] for i, c in enumerate(rel) if c == "."]
    return any(p.endswith(m) for p in prefixes for m in modules_to_save or ())


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def inspect_adapter(adapter_dir: Path) -> dict[str, Any]:
    """A description of the adapter in ``adapter_dir`` (what ``peft-rs inspect --json`` prints)."""
    if not adapter_dir.is_dir():
        raise CliError(f"{adapter_dir}: no such directory")
    problems: list[str] = []
    adapter = None
    try:
        adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    except (
        peft_rs.errors.AdapterFileNotFoundError,
        peft_rs.errors.AdapterIOError,
        peft_rs.errors.InvalidFileError,
    ):
        raise
    except peft_rs.PeftError as e:
        # The files can be read but do not form an adapter peft_rs (and PEFT) would load.
        problems.append(f"does not load: {e}")
    config = adapter.config.to_dict() if adapter is not None else _read_config(adapter_dir)
    peft_type = str(config.get("peft_type"))
    path = weights_file(adapter_dir)
    listing = read_listing(path)

    # What each method's files hold comes from the method registry (the Rust core).
    try:
        method = adapter.config if adapter is not None else peft_rs.PeftConfig.from_dict(config)
        param_names, shared_names = method.param_names, method.shared_names
    except peft_rs.PeftError:
        param_names, shared_names = None, []
    modules: dict[str, dict[str, TensorInfo]] = {}
    others: dict[str, tuple[TensorInfo, str]] = {}
    for key, info in sorted(listing.items()):
        rel = key.removeprefix(MODEL_PREFIX)
        split = _split_param(rel, param_names) if param_names and key.startswith(MODEL_PREFIX) else None
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = info
        elif key.removeprefix(SHARED_PREFIX) in shared_names:
            others[key] = (info, "shared")
        else:
            others[key] = (info, "")
    if adapter is not None and sorted(modules) != sorted(adapter.module_names()):
        problems.append(f"modules found in the file {sorted(modules)} differ from peft_rs's")
    for key, (info, role) in list(others.items()):
        rel = key.removeprefix(MODEL_PREFIX)
        if role or not key.startswith(MODEL_PREFIX):
            pass
        elif rel.rsplit(".base_layer.", 1)[0] in modules and ".base_layer." in rel:
            role = "base layer bias" if rel.endswith(".bias") else "base layer weight"
        elif _is_module_to_save(config.get("modules_to_save"), rel):
            role = "modules_to_save"
        elif config.get("bias", "none") != "none" and rel.endswith(".bias"):
            role = "bias"
        if not role:
            role = "unknown"
            if param_names is not None:
                problems.append(f"unknown key {key}")
        others[key] = (info, role)

    if adapter is not None:
        # Tensors inconsistent with each other or with the config (each names the key and the
        # expected and found shapes), checked by building each module's adapter on the base
        # layer its tensors imply.
        for module, message in adapter.check():
            where = f" in {module}" if module else ""
            problems.append(f"shape mismatch{where}: {message}")
    ranks = adapter.module_ranks() if adapter is not None else {}
    module_rows = []
    for name, tensors in sorted(modules.items()):
        rank = ranks.get(name)
        module_rows.append(
            {
                "name": name,
                "rank": rank,
                "parameters": sum(t.numel for t in tensors.values()),
                "tensors": {n: _tensor_json(t) for n, t in sorted(tensors.items())},
            }
        )
    # PEFT trains the adapter tensors, modules_to_save and biases; shared projections (VeRA) and
    # saved base-layer weights (embeddings) are frozen.
    frozen = {"shared", "base layer weight", "unknown"}
    trainable = sum(r["parameters"] for r in module_rows) + sum(
        info.numel for info, role in others.values() if role not in frozen
    )
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in listing.values()})
    return {
        "path": str(adapter_dir),
        "peft_type": peft_type,
        "peft_version": config.get("peft_version"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "weights_file": path.name,
        "file_size": path.stat().st_size,
        "dtypes": dtypes,
        "trainable_parameters": trainable,
        "total_parameters": sum(t.numel for t in listing.values()),
        "modules": module_rows,
        "other_tensors": [
            {"key": key, "role": role, **_tensor_json(info)} for key, (info, role) in others.items()
        ],
        "problems": problems,
    }


def _tensor_json(info: TensorInfo) -> dict[str, Any]:
    return {"dtype": DTYPE_NAMES.get(info.dtype, info.dtype), "shape": list(info.shape)}


def _tensor_text(name: str, t: dict[str, Any]) -> str:
    return f"{name} {t['shape']} {t['dtype']}"


def print_report(report: dict[str, Any], out: TextIO) -> None:
    targets = report["target_modules"]
    fields = [
        ("adapter", report["path"]),
        ("method", report["peft_type"]),
        ("weights", f"{report['weights_file']} ({format_bytes(report['file_size'])})"),
        ("dtypes", ", ".join(report["dtypes"]) or "-"),
        (
            "parameters",
            f"{report['trainable_parameters']:,} trainable, {report['total_parameters']:,} in file",
        ),
        ("targets", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("peft_version", report["peft_version"] or "-"),
        ("base model", report["base_model_name_or_path"] or "-"),
    ]
    for label, value in fields:
        out.write(f"{label:<13}{value}\n")
    rows = [
        (m["name"], "-" if m["rank"] is None else str(m["rank"]), f"{m['parameters']:,}",
         ", ".join(_tensor_text(n, t) for n, t in m["tensors"].items()))
        for m in report["modules"]
    ]  # fmt: skip
    out.write(f"\nmodules ({len(rows)})\n")
    _table(("module", "rank", "params", "tensors"), rows, out)
    if report["other_tensors"]:
        out.write(f"\nother tensors ({len(report['other_tensors'])})\n")
        other = [(t["key"], t["role"], _tensor_text("", t).strip()) for t in report["other_tensors"]]
        _table(("key", "role", "tensor"), other, out)
    out.write(f"\nproblems ({len(report['problems'])})\n")
    for p in report["problems"]:
        out.write(f"  {p}\n")
    if not report["problems"]:
        out.write("  none\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in (1, 2) and row is not header else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]  # fmt: skip
        out.write("  " + "  ".join(cells).rstrip() + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_adapter(Path(args.adapter_dir))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report, sys.stdout)
    return EXIT_PROBLEMS if report["problems"] else EXIT_OK


# ---------------------------------------------------------------------------------------------
# convert


def _float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounding to nearest even as torch does (NaN → 0x7FC0)."""
    bits = x.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    rounded[np.isnan(x)] = 0x7FC0
    return rounded


def cast_tensor(raw: bytes, source: str, target: str) -> bytes:
    """One tensor's little-endian bytes converted between float dtypes with a single rounding
    (as torch's ``Tensor.to``)."""
    if source == target:
        return raw
    if source == "BF16":
        values = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    else:
        values = np.frombuffer(raw, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[source])
    if target == "BF16":
        # torch casts float64 to bfloat16 through float32.
        return _float_to_bf16_bits(values.astype("<f4")).tobytes()
    return values.astype({"F32": "<f4", "F16": "<f2"}[target]).tobytes()


def cast_safetensors(path: Path, target: str, progress: Progress | None = None) -> None:
    """Rewrites the float tensors of a safetensors file in ``target`` dtype (atomically)."""
    tensors, metadata, data_start = read_safetensors_header(path)
    order = sorted(tensors, key=lambda k: tensors[k].offsets)
    total = sum(t.offsets[1] - t.offsets[0] for t in tensors.values())
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    chunks, offset, done = [], 0, 0
    with path.open("rb") as f:
        for name in order:
            info = tensors[name]
            f.seek(data_start + info.offsets[0])
            raw = f.read(info.offsets[1] - info.offsets[0])
            dtype = target if info.dtype in FLOAT_DTYPES else info.dtype
            data = cast_tensor(raw, info.dtype, dtype) if dtype != info.dtype else raw
            header[name] = {
                "dtype": dtype,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + len(data)],
            }
            chunks.append(data)
            offset += len(data)
            done += len(raw)
            if progress:
                progress(done, total)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    _write_atomic(path, [struct.pack("<Q", len(encoded)), encoded, *chunks])


def _write_atomic(path: Path, parts: Sequence[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_adapter(
    adapter_dir: Path, out_dir: Path, dtype: str = "keep", progress: Progress | None = None
) -> Path:
    """Writes ``adapter_dir`` (safetensors or ``adapter_model.bin``) to ``out_dir`` as safetensors,
    with float tensors in ``dtype`` (``"keep"``, ``"f32"``, ``"f16"``, ``"bf16"``); other files (README)
    are copied. Returns the safetensors path."""
    if not adapter_dir.is_dir():
        raise CliError(f"{adapter_dir}: no such directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir}: exists and is not a directory")
    # Loading through peft_rs validates the adapter (and reads .bin through candle's pickle reader).
    adapter = peft_rs.PeftAdapter.from_pretrained(adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = Path(adapter.save_pretrained(out_dir))
    target = written / SAFETENSORS_NAME
    if dtype != "keep":
        cast_safetensors(target, CLI_DTYPES[dtype], progress)
    for item in adapter_dir.iterdir():
        if item.is_file() and item.name not in (SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME):
            dest = written / item.name
            if not dest.exists() or not dest.samefile(item):
                shutil.copy2(item, dest)
    return target


def cmd_convert(args: argparse.Namespace) -> int:
    progress = Progress("convert")
    try:
        target = convert_adapter(Path(args.adapter_dir), Path(args.out), args.dtype, progress)
    finally:
        progress.close()
    print(f"wrote {target}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# merge and combine (thin front ends of peft_rs.merge_checkpoint / peft_rs.combine_adapters)


def _check_weights(weights: list[float] | None, adapters: list[str]) -> None:
    if weights is not None and len(weights) != len(adapters):
        raise CliError(f"--weights has {len(weights)} values for {len(adapters)} adapters")


def cmd_merge(args: argparse.Namespace) -> int:
    _check_weights(args.weights, args.adapter_dirs)
    progress = Progress("merge")
    try:
        peft_rs.merge_checkpoint(
            args.base_dir,
            args.adapter_dirs,
            args.out,
            weights=args.weights,
            dtype=TORCH_DTYPE_NAMES.get(args.dtype),
            resume=args.resume,
            progress=progress if progress.enabled else None,
        )
    finally:
        progress.close()
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_combine(args: argparse.Namespace) -> int:
    _check_weights(args.weights, args.adapter_dirs)
    options = {
        "combination_type": args.combination_type,
        "svd_rank": args.svd_rank,
        "svd_clamp": args.svd_clamp,
        "density": args.density,
        "majority_sign_method": args.majority_sign_method,
        "seed": args.seed,
    }
    given = {k: v for k, v in options.items() if v is not None}
    result = peft_rs.combine_adapters(args.adapter_dirs, args.weights, args.out, **given)
    # exact_svd returns (directory, {module: relative truncation error}).
    written, errors = result if isinstance(result, tuple) else (result, None)
    if args.json:
        report: dict[str, object] = {"out": str(written), "combination_type": args.combination_type}
        if errors is not None:
            report["truncation_errors"] = errors
            report["max_relative_error"] = max(errors.values(), default=0.0)
            report["mean_relative_error"] = sum(errors.values()) / len(errors) if errors else 0.0
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"wrote {written}")
    if errors is not None:
        largest = max(errors.values(), default=0.0)
        mean = sum(errors.values()) / len(errors) if errors else 0.0
        worst = max(errors, key=errors.__getitem__) if errors else "-"
        print(
            f"truncation error ||dW - BA||_F / ||dW||_F over {len(errors)} modules: "
            f"max {largest:.3e} ({worst}), mean {mean:.3e}"
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# command line

COMBINATION_TYPES = (
    "svd, linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
    "magnitude_prune, magnitude_prune_svd, exact (ΔW = Σ wᵢ ΔWᵢ exactly, rank Σ rᵢ), "
    "exact_svd (its best approximation of rank --svd-rank; prints the truncation error)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), exit status 2 as usual."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Inspect, convert, merge and combine PEFT adapter files; fine-tune a classifier "
        "(peft_rs).",
        epilog="Errors print one line 'peft-rs: error: ...' and exit with status 2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {peft_rs.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="describe an adapter directory",
        description="Method, target modules, rank per module, parameter counts, dtypes, file size, "
        "PEFT version fields and problems found (files peft_rs does not load, unknown keys). "
        "Exit status 1 when problems are found, 2 when the files cannot be read.",
    )
    p.add_argument("adapter_dir", metavar="DIR", help="adapter directory (PEFT's save_pretrained)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="rewrite an adapter as safetensors, optionally in another dtype",
        description="Reads DIR (adapter_model.safetensors or adapter_model.bin) and writes "
        "adapter_model.safetensors and adapter_config.json to --out; other files are copied.",
    )
    p.add_argument("adapter_dir", metavar="DIR", help="adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--dtype",
        default="keep",
        choices=("keep", *CLI_DTYPES),
        help="dtype of the float tensors (default keep)",
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser(
        "merge",
        help="fold adapters into a transformers checkpoint, tensor by tensor",
        description="Streams BASE_DIR (model.safetensors or shards with an index), merges every "
        "adapter into the tensors it targets and writes the same layout to --out; other files "
        "are copied.",
    )
    p.add_argument("base_dir", metavar="BASE_DIR", help="transformers checkpoint directory")
    p.add_argument("adapter_dirs", metavar="ADAPTER_DIR", nargs="+", help="adapter directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one scale per adapter")
    p.add_argument(
        "--dtype", default="keep", choices=("keep", *CLI_DTYPES), help="dtype of the output (default keep)"
    )
    p.add_argument("--resume", action="store_true", help="keep shards already complete and verified")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser(
        "combine",
        help="combine adapters into one (PEFT's add_weighted_adapter)",
        description="Writes one adapter combining the given ones, as PEFT's add_weighted_adapter.",
    )
    p.add_argument("adapter_dirs", metavar="ADAPTER_DIR", nargs="+", help="adapter directories")
    p.add_argument(
        "--weights", type=float, nargs="+", required=True, metavar="W", help="one weight per adapter"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--combination-type",
        metavar="TYPE",
        help=f"LoRA: one of {COMBINATION_TYPES} (default svd); IA³ adapters take none",
    )
    p.add_argument(
        "--svd-rank",
        type=int,
        metavar="R",
        help="rank of the SVD types' result (default the largest source rank; exact_svd: at most Σ rᵢ)",
    )
    p.add_argument("--svd-clamp", type=float, metavar="Q", help="quantile clamp of the SVD types")
    p.add_argument("--density", type=float, help="fraction kept by ties / dare / magnitude_prune")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"), help="ties sign election")
    p.add_argument("--seed", type=int, help="seed of DARE's random masks")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON object (output directory; for exact_svd the per-module, largest and mean "
        "relative truncation errors)",
    )
    p.set_defaults(run=cmd_combine)

    from peft_rs import finetune  # imports this module: registered last

    finetune.add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse's own errors exit 2
    try:
        return int(args.run(args))
    except (CliError, peft_rs.PeftError, OSError, ValueError) as e:
        if isinstance(e, BrokenPipeError):  # `peft-rs inspect DIR | head`
            _silence_stdout()
            return EXIT_OK
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    devnull: BinaryIO = open(os.devnull, "wb")  # kept open until the process exits
    os.dup2(devnull.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
