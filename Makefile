# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

bench: setup
	.venv/bin/python benchmarks/bench_matcher.py
	.venv/bin/python benchmarks/bench_store.py
	.venv/bin/python benchmarks/bench_extract.py
