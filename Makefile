# make venv | make demo | make test        (needs python3.11 and pip)
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo test

venv: $(STAMP)

# Reused when present: the stamp is only rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/albef-ray pretrain --config experiments/demo_cpu.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
