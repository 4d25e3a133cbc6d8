# qvla: `make demo` and `make test` work on a fresh machine (CPU only).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
EPISODES ?= 5

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	@# EGL rendering needs Debian's GL libraries; install them when apt is available and they are missing.
	@if ! ldconfig -p | grep -q libEGL.so.1 && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq libegl1 libgl1 libgles2 >/dev/null; fi
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	@# qvla's low-bit CPU kernel: built once here (cached by torch), not in the first evaluation worker
	$(BIN)/python -c "from qvla.quant import lowbit; print('low-bit kernel:', 'built' if lowbit.available() else 'not available, using torch int4')"

demo: install
	MUJOCO_GL=egl $(BIN)/python -m qvla.demo_run --episodes-per-task $(EPISODES) --out results/demo

test: install
	MUJOCO_GL=egl $(BIN)/python -m pytest -q -x --durations=10

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
