# ocppgw developer tasks; `make run` and `make test` are the README's
# quick start. The virtualenv is .venv (override with VENV=...).
#
# `make run` installs only what the gateway needs to run; `make venv`,
# `make test` and `make docs` add the test extras (test clients, linters and
# validators of deploy/, Sphinx, ...), which the gateway itself never imports.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/ocppgw.ini

# editable_mode=compat puts the checkout itself on sys.path: Twisted finds
# plugins by scanning sys.path for twisted/plugins/, which the default
# (PEP 660 import hook) editable install does not expose, so twistd would
# not know "ocppgw" (`ocppgw run` would still work).
EDITABLE = --config-settings editable_mode=compat

.PHONY: venv run test docs clean

venv: $(VENV)/.installed

# the project and its runtime dependencies
$(VENV)/.runtime: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e . $(EDITABLE)
	touch $@

# ... and the test extras
$(VENV)/.installed: $(VENV)/.runtime
	$(VENV)/bin/pip install -e '.[test]' $(EDITABLE)
	touch $@

# The gateway in the foreground against the broker in $(CONFIG); Ctrl-C stops it.
run: $(VENV)/.runtime
	$(VENV)/bin/twistd -n --pidfile= ocppgw --config $(CONFIG)

# Starts the local RabbitMQ if it is down (see .ci/ensure-rabbitmq).
test: venv
	PYTHON=$(VENV)/bin/python .ci/ensure-rabbitmq
	$(VENV)/bin/python -m twisted.trial --reactor=asyncio tests

# The Sphinx site under docs/ into docs/_build/html; a warning (a broken
# link, a page outside the table of contents) fails the build.
docs: venv
	$(VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* .hypothesis twisted/plugins/dropin.cache docs/_build
