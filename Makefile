# The commands the README names.  Both run as root on a fresh Debian machine and
# install what they need through apt-get and pip; nothing is expected by hand.

PYTHON ?= /usr/bin/python3
VENV ?= .venv
PYTEST_ARGS ?=

# What jwbackup needs at run time, and what the test suite needs on top.
RUN_DEBS = rsync openssh-client python3 python3-venv python3-yaml python3-debian
TEST_DEBS = $(RUN_DEBS) openssh-server sshpass acl attr

# Install the Debian packages named in $(1) that are not installed yet; refresh
# the package lists first only when something has to be installed.
define apt_install
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	    echo "apt-get install $$missing"; \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

.PHONY: backup check test-deps run-deps venv clean

## backup: install jwbackup with its dependencies and run a real backup (default config)
backup: run-deps
	$(PYTHON) -m venv --system-site-packages /opt/jwbackup
	/opt/jwbackup/bin/pip install -q --no-deps .
	ln -sf /opt/jwbackup/bin/jwbackup /usr/local/sbin/jwbackup
	[ -e /etc/jwbackup.yaml ] || install -m 0644 etc/jwbackup.yaml /etc/jwbackup.yaml
	jwbackup
	jwbackup list

## check: install every test dependency and run the test suite
check: test-deps venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

run-deps:
	$(call apt_install,$(RUN_DEBS))

test-deps:
	$(call apt_install,$(TEST_DEBS))

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt -e .
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info
