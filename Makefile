# Shortcuts; the scripts in scripts/ are the source of truth.
.PHONY: setup check test lint bench demo

VENV := .venv/bin

setup:          ## install Debian packages and .venv, run the demo
	./scripts/setup.sh

check:          ## every check: lint, types, layers, tests
	./scripts/test.sh

test:           ## pytest only
	$(VENV)/pytest -n 2

lint:           ## ruff, mypy, import-linter
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/mypy bench scripts
	$(VENV)/lint-imports

bench:          ## file- and disk-image benchmarks against restic and borg (slow, uses /var/tmp)
	$(VENV)/python bench/files.py $(BENCH_ARGS)
	$(VENV)/python bench/disks.py $(DISK_BENCH_ARGS)

demo:           ## back up, change, back up, restore and compare a sample tree
	./scripts/demo.sh
