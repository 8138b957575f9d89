# mailgate: `make run` serves POP3 and SMTP on embedded SQLite; `make test`
# runs the whole suite.  Both set up everything they need in .venv first.

# The interpreter .venv is made from.  Debian's own python3.11 where it can
# make a venv (package python3.11-venv): Debian builds it with profile-guided
# and link-time optimisation and links libpython into its binary, and
# mailgate's POP3 sessions cost 5-13 % less CPU on it (0-10 % over TLS)
# than on a Python 3.11 built from source without them, as pyenv builds by
# default (benchmarks/RESULTS.md).  Elsewhere, python3.  `make PYTHON=...` picks
# another; after changing it, `make clean` so that .venv is made again.
DEBIAN_PYTHON := /usr/bin/python3.11
PYTHON ?= $(shell $(DEBIAN_PYTHON) -c 'import ensurepip, venv' 2>/dev/null && echo $(DEBIAN_PYTHON) || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed

.PHONY: run test bench venv install clean sysdeps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Third-party dependencies, installed once (again when setup.cfg or this
# file changes): setup.cfg's, with its floors (tests/test_dependencies.py
# checks they agree).  pytest below 9.2 here: 9.2 keeps a test's node id
# where pytest-xdist 3.8's --dist loadgroup (make test's) no longer adds
# the group to it, so the tests sharing a module's costly fixture (a
# private Dovecot, an import waiting out Dovecot's lock) were spread over
# the workers, each setting it up (tests/conftest.py fails on that).
$(STAMP): $(BIN)/python setup.cfg pyproject.toml Makefile
	$(BIN)/pip install --quiet 'twisted[tls]>=23.10' 'zope.interface>=5' \
		'service-identity>=24.2' 'attrs>=22.1' 'prometheus-client>=0.17' 'pytest>=7' 'pytest<9.2' 'pytest-xdist>=3.0.2' 'hypothesis>=6' 'psycopg[binary]>=3.3.6' \
		'passlib>=1.7.4' 'bcrypt>=4' 'argon2-cffi>=23.1' 'cryptography>=42' 'idna>=2.4' 'PyJWT>=2.6' \
		'setuptools>=68' wheel
	touch $@

venv: $(STAMP)

# A regular (non-editable) install: that is what users get, and it is the
# only kind that puts twisted/plugins/mailgate_plugin.py where twistd looks.
install: venv
	rm -rf build
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	rm -rf build
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# The whole gateway on loopback: mail in by SMTP on 2525, out by POP3 on
# 1110.  The lines printed are the README's quick start (tests/test_quickstart.py
# runs them).
run: install
	@echo "mailgate: POP3 on 127.0.0.1:1110, SMTP on 127.0.0.1:2525, database ./mailgate.sqlite3"
	@echo "mailgate: add a user with:"
	@printf '%s\n' "  $(BIN)/mailgate user add you@example.org"
	@echo "mailgate: send it a message by SMTP with:"
	@printf '%s\n' "  printf 'Subject: hello\r\n\r\nfirst message\r\n' | curl -sS smtp://127.0.0.1:2525 --mail-from me@example.net --mail-rcpt you@example.org -T -"
	@echo "mailgate: read it by POP3 with:"
	@printf '%s\n' "  curl -u you@example.org pop3://127.0.0.1:1110/1"
	$(BIN)/twistd --pidfile= -n mailgate --smtp tcp:2525:interface=127.0.0.1

# PostgreSQL for the suite: tests/pgserver.py starts the machine's cluster
# (or a private one) and exports MAILGATE_TEST_POSTGRES; it fails loudly if
# server binaries exist but no server will start.
# The Debian packages of the real programs the suite runs (tests/sysdeps.sh).
sysdeps:
	@sh tests/sysdeps.sh

# The suite runs in two phases, both always: first the tests marked
# serial (setup.cfg: they disturb what the others share, e.g. stop the
# PostgreSQL server), alone; then all the others on TEST_WORKERS parallel
# pytest-xdist workers.  Most tests wait on sockets and spawned servers
# more than they compute, so more workers than cores pays.  --dist
# loadgroup keeps a module's tests that share a module-scoped fixture on
# one worker (tests/conftest.py).  make test fails if either phase did.
# `make test TEST_WORKERS=1` runs them one at a time.
TEST_WORKERS ?= 4

test: install sysdeps
	@pgenv="$$($(BIN)/python tests/pgserver.py)" || exit 1; eval "$$pgenv"; \
	serial=0; $(BIN)/python -m pytest -m serial tests || serial=$$?; \
	parallel=0; $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not serial" tests || parallel=$$?; \
	if [ $$serial -ne 0 ]; then echo "make test: the serial phase failed (pytest exited $$serial): its report is above the parallel phase's"; fi; \
	[ $$serial -eq 0 ] && [ $$parallel -eq 0 ]

# The benchmark suite (benchmarks/run.py): PostgreSQL started as for `make
# test`, Dovecot compared if installed, mailgate profiled with py-spy
# (installed into .venv here; without it the profile is skipped).  Figures
# go to benchmarks/last-run/; `make bench BENCH_ARGS=--quick` is a smoke run.
PYSPY := py-spy==0.4.3

bench: install
	@test -x $(BIN)/py-spy || $(BIN)/pip install --quiet '$(PYSPY)' || echo "bench: could not install $(PYSPY); no profile"
	@pgenv="$$($(BIN)/python tests/pgserver.py)" || exit 1; eval "$$pgenv"; \
	$(BIN)/python benchmarks/run.py --output benchmarks/last-run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
