# Two commands: `make demo` (train + lens callback on the embedded corpus) and `make test`.
# Both create or reuse the virtual environment in $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
# Where no NVIDIA GPU is present, take PyTorch's CPU build: from pip's configured sources first (these
# machines keep torch 2.13.0+cpu in a local wheel folder), else from PyTorch's CPU index (PyPI's Linux
# torch is the CUDA build); with a GPU, let pip resolve the project's own range (a CUDA build).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH ?= $(if $(HAS_GPU),torch>=2.6,torch==2.13.0+cpu)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench device-wheels report clean

# the stamp alone is not trusted: a venv whose interpreter, packages or entry points went away is set
# up again (-I: the installed package, not the source tree in the working directory)
venv:
	@{ $(PY) -I -c "import torch, lens_callback" && test -x $(VENV)/bin/lens-train; } 2>/dev/null || rm -f $(VENV)/.installed
	@$(MAKE) --no-print-directory $(VENV)/.installed

# a venv without a working pip (e.g. its creation was interrupted) is made again from scratch
$(VENV)/.installed: pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || python3 -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)" \
		|| $(if $(HAS_GPU),false,$(PY) -m pip install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/lens-train fit --config configs/default.yaml
	latest=$$(ls -d runs/default/version_* | sort -t_ -k2 -n | tail -n 1) && \
	$(VENV)/bin/lens-report "$$latest" -o "$$latest/report.png"

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py

# wheels a lent GPU machine lacks, for bench/device_check.sh (see its header)
# (.whl is made afresh: two versions of one package stop the install there; and it must hold one wheel
# per line of the list, or the device run would be spent on an import error)
device-wheels: venv
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r bench/device_wheels.txt
	@wanted=$$(grep -cEv '^[[:space:]]*(#|$$)' bench/device_wheels.txt); got=$$(ls .whl/*.whl | wc -l); \
	if [ "$$got" -ne "$$wanted" ]; then echo ".whl holds $$got wheels for $$wanted lines of bench/device_wheels.txt: do not run the device check" >&2; exit 1; fi

clean:
	rm -rf runs lightning_logs .pytest_cache
