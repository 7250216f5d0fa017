# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
# The install and the demo are timed separately (whole seconds, wall clock); each says its own time when it ends.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# seconds since the time written in file $(1)
SINCE = $$(( $$(date +%s) - $$(cat $(1)) ))

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@mkdir -p $(VENV) && date +%s > $(VENV)/.install-started
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU build and never a CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e ".[test]"
	touch $(STAMP)
	@s=$(call SINCE,$(VENV)/.install-started); echo "install: $$s s ($$((s / 60)) min $$((s % 60)) s)"

install: $(STAMP)

demo: $(STAMP)
	@date +%s > $(VENV)/.demo-started
	$(BIN)/thrifty bench demo
	$(BIN)/thrifty bench metaworld-demo
	@s=$(call SINCE,$(VENV)/.demo-started); echo "demo: $$s s ($$((s / 60)) min $$((s % 60)) s), the install not included"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results
