# Two commands for a newcomer: `make demo` and `make test`. Both set up what they need
# (virtual environment, Debian's Orthanc for the PACS and Chromium for page tests, npm test peers) and are safe to re-run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS  := tests/peers/node_modules/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: demo test check serve models system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,test]'
	touch $@

system-deps:
	@if ! command -v Orthanc >/dev/null || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  echo "installing Debian's orthanc + orthanc-dicomweb (the PACS for the demo and tests)"; \
	  $(APT) update -qq && $(APT) install -y -qq orthanc orthanc-dicomweb >/dev/null; fi
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null; then \
	  echo "installing Debian's dcmtk and dicom3tools (DICOM senders and the SR validator for the tests)"; \
	  $(APT) update -qq && $(APT) install -y -qq dcmtk dicom3tools >/dev/null; fi
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing Debian's chromium (headless, for the worklist and dashboard browser tests)"; \
	  $(APT) update -qq && $(APT) install -y -qq chromium >/dev/null; fi
	@if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then \
	  echo "installing Debian's haproxy (the load balancer in front of the replicas, tests/test_replicas.py)"; \
	  $(APT) update -qq && $(APT) install -y -qq haproxy >/dev/null; fi

$(PEERS): tests/peers/package.json
	@command -v npm >/dev/null || { $(APT) update -qq && $(APT) install -y -qq nodejs npm >/dev/null; }
	cd tests/peers && npm install --no-audit --no-fund --loglevel=error
	touch $@

models: $(STAMP)
	$(BIN)/python scripts/build_reference_models.py

demo: $(STAMP) system-deps models
	$(BIN)/interop demo

serve: $(STAMP) models
	$(BIN)/interop serve

# lint, types (strict where the rest stands), the layering contract, dead code: zero findings
check: $(STAMP)
	$(BIN)/ruff check interop inference_client scripts tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/vulture

# two test processes (pytest-xdist), each with its own PostgreSQL, Triton and PACS: the suite waits on
# peers more than it computes, so two keep two cores busy
test: $(STAMP) system-deps $(PEERS) models check
	$(BIN)/python -m pytest -n 2

bench: $(STAMP) system-deps models
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) var tests/peers/node_modules
