# The two set-up commands named in README.md:
#   make run   - embedded SQLite + filesystem broker: web, worker and beat, Ctrl-C stops all three
#   make test  - the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint venv chromium dicomtools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cxr run

# Debian's Chromium for the one browser test (Playwright cannot download its own browser here).
chromium:
	@{ command -v /usr/bin/chromium && command -v pdftoppm; } >/dev/null 2>&1 || bash scripts/install_chromium.sh

# Debian's dcmtk, dicom3tools and GDCM tools: the real DICOM clients and validators the DICOM tests drive.
dicomtools:
	@bash scripts/install_dicom_tools.sh

test: $(STAMP) chromium dicomtools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
