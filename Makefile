# Two commands do everything: `make run` (set up + run the pipeline) and `make test` (set up + run the tests).
VENV := .venv
PYTHON := $(VENV)/bin/python
# Stage commands in dvc.yaml call `python`: the virtual environment must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
MLFLOW_PORT ?= 5000
EXECUTOR ?= serial

.PHONY: setup data run plan recipe study test test-slow ui bench device-wheels clean

$(VENV)/installed.stamp: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.lock
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/installed.stamp

data: setup  ## materialise the embedded digits dataset (deterministic bytes, matches data.dvc)
	$(PYTHON) -m pipeline.data digits --root data
	dvc add --quiet data

run: data  ## set up and run the whole pipeline on the embedded default
	dvc repro
	dvc metrics show metrics/evaluate.json

plan: setup  ## what pruning will do, in seconds, no training: make plan [ARGS="--suggest" or "prune.ratio=0.5 --json"]
	$(PYTHON) -m pipeline.plan $(ARGS)

recipe: setup  ## apply a paper recipe as params.yaml and run it: make recipe NAME=resnet56_cifar10
	@test -f recipes/$(NAME).yaml || { echo "No recipe 'recipes/$(NAME).yaml'. Available: $$(cd recipes && ls *.yaml | sed 's/\.yaml$$//' | tr '\n' ' ')"; exit 2; }
	cp recipes/$(NAME).yaml params.yaml
	dvc repro

study: data  ## run a study (methods x ratios x LRs x seeds): make study NAME=table1 [EXECUTOR=ray [ADDRESS=auto]]; report in results/NAME/
	@test -f studies/$(NAME).yaml || { echo "No study 'studies/$(NAME).yaml'. Available: $$(cd studies && ls *.yaml | sed 's/\.yaml$$//' | tr '\n' ' ')"; exit 2; }
	$(PYTHON) -m pipeline.study studies/$(NAME).yaml --executor $(EXECUTOR) $(if $(ADDRESS),--address $(ADDRESS))

test: setup  ## set up and run the default test suite (a few minutes on 2 cores)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-slow: setup  ## the tests marked slow: whole `dvc repro` runs, kills and resumes, remotes, DDP, studies (CI runs them too)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m slow

ui: setup  ## browse the runs in the MLflow UI at http://127.0.0.1:$(MLFLOW_PORT)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

bench: setup  ## TPP step overhead and pruned-vs-dense latency (prints figures)
	$(PYTHON) benchmarks/tpp_overhead.py

# A lent GPU machine has torch, pytest, onnx(runtime), rich and scikit-learn but no registry: it gets the rest as
# wheels (antlr4's is built here from its sdist). Carry .whl/ and run benchmarks/device_check.sh there.
device-wheels: setup  ## wheels a GPU machine without a registry lacks, in .whl/ (see README: GPU checks)
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl $$(grep -E '^(torch-pruning|hydra-core|omegaconf|onnxscript|onnx-ir)==' requirements.lock)
	$(PYTHON) -m pip wheel --quiet --no-deps -w .whl $$(grep -E '^antlr4-python3-runtime==' requirements.lock)

clean:  ## remove pipeline outputs (they stay in the DVC cache)
	rm -rf models metrics plots reports
