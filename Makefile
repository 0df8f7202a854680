# make book : set up .venv if needed, run every notebook in order on the demo cohort, build the HTML book
# make test : set up .venv if needed, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
WORKDIR ?= $(CURDIR)/work
# Atlas files: a folder that holds them (set WMLOC_DATA), else the JHU files staged beside a
# development checkout, else they are downloaded and verified into the per-user cache.
WMLOC_DATA ?= $(wildcard $(CURDIR)/../shared/data/jhu-eve)
export WMLOC_DATA
# The paper authors' subject region maps (benchmarks/bench_authors_labels.py): likewise.
WMLOC_AUTHORS_LABELS ?= $(wildcard $(CURDIR)/../shared/data/authors-labels)
export WMLOC_AUTHORS_LABELS

.PHONY: setup book site test bench clean browser
.DELETE_ON_ERROR:  # a failed site build leaves no index.html that would look up to date

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The runner skips notebooks unchanged since their last run; the site is rebuilt only when a page's
# source is newer than it (a sub-make, so that it sees the executed notebooks the runner just wrote).
book: setup
	$(PY) -m wmloc_utils.book --workdir $(WORKDIR)
	@$(MAKE) --no-print-directory site
	@echo "Book: $(CURDIR)/_build/html/index.html"

site: _build/html/index.html

_build/html/index.html: $(wildcard book/notebooks/*.ipynb book/*.md book/*.bib book/_toc.yml) _config.yml
	$(VENV)/bin/jupyter-book build -W -n --keep-going book/

# The site tests open every page in headless Chromium from Debian (never a browser playwright downloads).
# Nothing to do when one is installed; as root with apt-get it is installed; else the test fails and says how.
BROWSERS := chromium-headless-shell chromium
browser:
	@if [ -n "$$(command -v $(BROWSERS); ls $(BROWSERS:%=/usr/lib/chromium/%) 2>/dev/null)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing headless Chromium for the site's browser test (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
	  { apt-get install -y -qq --no-install-recommends chromium-headless-shell \
	    || apt-get install -y -qq --no-install-recommends chromium; } \
	  || echo "apt-get could not install Chromium: the site's browser test will fail"; \
	else echo "No Chromium found: the site's browser test will fail. Install one as root:" \
	  "apt-get install chromium-headless-shell (or chromium)"; fi

test: setup browser
	$(PY) -m pytest -v --durations=15

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build book/notebooks work
