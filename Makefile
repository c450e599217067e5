# make venv | make demo | make demo-full | make demo-tensors | make test        (needs python3.11 and pip)
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-full demo-tensors test

venv: $(STAMP)

# Reused when present: the stamp is only rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

# The paper's Table 1 on the synthetic benchmark: generate it and its unimodal initial weights
# (once), run the four variants x 3 seeds on Ray Tune (albef_tiny_64, CPU; each trial pretrains,
# evaluates zero-shot, fine-tunes for retrieval and evaluates), print the comparison. Run again
# to resume an interrupted sweep.
demo: $(STAMP)
	test -f runs/synth/manifest.json || $(VENV)/bin/albef-ray data synth runs/synth --no-progress
	test -f runs/synth/init64/report.json || $(VENV)/bin/albef-ray data synth-init runs/synth --size albef_tiny_64 --out runs/synth/init64
	$(VENV)/bin/albef-ray sweep ablations/table1.yaml

# Table 1 with every column (retrieval, SNLI-VE, NLVR2, VQA fine-tuning per trial): hours on 2 CPU cores.
demo-full: $(STAMP)
	test -f runs/synth/manifest.json || $(VENV)/bin/albef-ray data synth runs/synth --no-progress
	test -f runs/synth/init64/report.json || $(VENV)/bin/albef-ray data synth-init runs/synth --size albef_tiny_64 --out runs/synth/init64
	test -f runs/synth_ve/manifest.json || $(VENV)/bin/albef-ray data synth-task ve runs/synth_ve --from runs/synth --no-progress
	test -f runs/synth_nlvr/manifest.json || $(VENV)/bin/albef-ray data synth-task nlvr runs/synth_nlvr --from runs/synth --no-progress
	test -f runs/synth_vqa/manifest.json || $(VENV)/bin/albef-ray data synth-task vqa runs/synth_vqa --from runs/synth --train 12000 --no-progress
	$(VENV)/bin/albef-ray sweep ablations/table1_full.yaml

# One pretraining run on generated tensors (about a minute).
demo-tensors: $(STAMP)
	$(VENV)/bin/albef-ray pretrain --config experiments/demo_cpu.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
