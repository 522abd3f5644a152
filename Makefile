# Set-up and test entry points (see README.md).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: deps build example quickstart test test-rust test-python lint bench bench-rust golden stubs

deps:
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt

# Release wheel of the bindings, installed into the current Python.
build: deps
	rm -rf dist
	maturin build --release --out dist
	$(PIP) install --quiet --disable-pip-version-check --force-reinstall --no-deps dist/peft_rs-*.whl

# The main job on a built-in default: fine-tune MiniLM-L6 with LoRA on the VADER sentiment
# lexicon (held-out accuracy before/after, adapter directory + loss curve in finetune-lora/).
example: build
	peft-rs finetune --out finetune-lora --overwrite

# peft_rs' LoRA on MiniLM-L6 reloaded by HuggingFace PEFT; fails if the outputs disagree.
quickstart: build
	$(PYTHON) examples/quickstart.py

test: build test-rust test-python

test-rust:
	cargo test -p peft-rs

# pytest exits 5 when it collects no test; make treats any non-zero exit as failure.
test-python:
	$(PYTHON) -m pytest tests

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	ruff check python tests benches examples tools
	ruff format --check python tests benches examples tools

bench: build
	$(PYTHON) benches/bench_speed.py
	$(PYTHON) benches/bench_lora.py
	$(PYTHON) benches/bench_methods.py
	$(PYTHON) benches/bench_models.py
	$(PYTHON) benches/bench_merge.py
	$(PYTHON) benches/bench_train.py

bench-rust:
	cargo bench -p peft-rs --bench methods

# Regenerate the PEFT-made golden files the Rust tests read.
golden: deps
	$(PYTHON) tests/generate_golden.py

# Rewrite the registry-made part of python/peft_rs/_core.pyi (after adding a method).
stubs: build
	$(PYTHON) tools/gen_stubs.py
