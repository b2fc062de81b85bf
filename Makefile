# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= datasets/synth
RUN    ?= runs/demo
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint bench gpu-check device-wheels clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt -r requirements-dev.txt
	$(PIP) --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

venv: $(STAMP)

$(DATA)/property: | $(STAMP)
	@echo "== make demo 1/4: synthetic training set (400 identities x 15 images) and seven .bin sets =="
	$(PY) prepare_data.py synth --out $(DATA) --identities 400 --images-per-id 15 --pairs 0.02 --difficulty 0.3

$(DATA)/IJBC/meta/ijbc_template_pair_label.txt: | $(STAMP)
	@echo "== make demo 2/4: a synthetic IJB-C release (60 held-out identities, full nuisance: --difficulty 1.0) =="
	$(PY) prepare_data.py synth --out $(DATA) --ijb-only --ijb-subjects 60 --difficulty 1.0

# Generate the synthetic sets (once), train a small ViT (vit_mini, AdamW + CosFace, 5 epochs) on the
# CPU, then evaluate the untrained and the trained weights side by side: the seven .bin sets and IJB-C.
demo: $(STAMP) $(DATA)/property $(DATA)/IJBC/meta/ijbc_template_pair_label.txt
	rm -rf $(RUN)
	@echo "== make demo 3/4: training vit_mini (--preset vit_demo) on the CPU =="
	$(PY) train.py --preset vit_demo --data $(DATA) --output $(RUN) --save-init
	@echo "== make demo 4/4: evaluating the untrained and the trained weights =="
	$(PY) evaluate.py $(RUN)/backbone_init.pt $(RUN)/backbone.pt --data $(DATA) --ijb $(DATA)/IJBC \
		--report $(RUN) --batch-size 64

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_backbones.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_partial_fc.py
	$(PY) benchmarks/bench_ijb.py
	$(PY) benchmarks/bench_ijb_pipeline.py

# The GPU proof (at most 8 minutes on one H100/H200): six checks, results in benchmarks/results/gpu_check.json/.md.
# Needs no venv: it runs with .venv's Python if there is one, else python3 (a GPU image's own torch), after
# installing any wheels carried in .whl/. Without CUDA it says so and exits; `--dry-run` rehearses it on the CPU.
gpu-check:
	bash benchmarks/gpu_check.sh

# The wheels a lent GPU machine without a network lacks, built or fetched here into .whl/ (git-ignored) to carry
# along: its image has torch 2.11, torchvision, OpenCV, scikit-learn, ... but not TorchCodec (fetched for its Python,
# DEVICE_PYTHON; torchcodec >= 0.12 runs on any torch >= 2.11, and its Linux x86-64 wheel carries nvJPEG) nor
# efficientnet-pytorch (a source-only package: a wheel is built). The scripts start without them (gpu-check then
# times one device codec, torchvision's).
DEVICE_PYTHON ?= 3.12
device-wheels: $(STAMP)
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w .whl \
		"efficientnet-pytorch==$$($(PY) -c 'import importlib.metadata as m; print(m.version("efficientnet-pytorch"))')"
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
		--python-version $(DEVICE_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		"torchcodec==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torchcodec").split("+")[0])')"
	@ls -l .whl/*.whl

clean:
	rm -rf $(RUN) $(DATA) .pytest_cache
