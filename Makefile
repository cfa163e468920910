# The commands the README names.  Both run as root on a fresh Debian machine and
# install what they need through apt-get and pip; nothing is expected by hand.

PYTHON ?= /usr/bin/python3
VENV ?= .venv
PYTEST_ARGS ?=
# The configuration "make backup" runs with: the installed default, all of /.
# BACKUP_CONFIG=etc/examples/jwbackup-quick.yaml limits it to /etc, /var/lib
# and /usr/local, for a quick look on a machine whose / holds many gigabytes.
BACKUP_CONFIG ?= /etc/jwbackup.yaml

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' jwbackup/__init__.py)
DEB_VERSION := $(shell sed -n '1s/^jwbackup (\(.*\)).*/\1/p' debian/changelog)
DEB := build/deb/jwbackup_$(DEB_VERSION)_all.deb

# What jwbackup needs at run time, what building the .deb needs, and what the
# test suite needs on top.
RUN_DEBS = rsync openssh-client python3 python3-venv python3-yaml python3-debian
BUILD_DEBS = dpkg-dev debhelper dh-python python3-all python3-setuptools fakeroot
TEST_DEBS = $(RUN_DEBS) $(BUILD_DEBS) openssh-server sshpass acl attr lintian man-db systemd logrotate borgbackup borgmatic restic

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

.PHONY: backup check test-deps run-deps build-deps venv deb dist man clean

## backup: build and install the jwbackup .deb, then run a real backup
backup: deb
	# --reinstall: a rebuilt .deb of the same version replaces the installed one.
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --no-install-recommends ./$(DEB)
	jwbackup -c $(BACKUP_CONFIG) init
	jwbackup -c $(BACKUP_CONFIG)
	jwbackup -c $(BACKUP_CONFIG) list

## check: install every test dependency and run the test suite
check: test-deps venv
	$(VENV)/bin/python -m pyflakes jwbackup tests bench tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

## deb: build build/deb/jwbackup_<version>_all.deb from a copy of the tree
deb: build-deps
	rm -rf build/deb
	mkdir -p build/deb/jwbackup-$(VERSION)
	tar -cf - --exclude=./.git --exclude=./$(VENV) --exclude=./build --exclude=./dist \
	    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache . \
	    | tar -xf - -C build/deb/jwbackup-$(VERSION)
	cd build/deb/jwbackup-$(VERSION) && dpkg-buildpackage -us -uc -b
	@echo "built $(DEB)"

## dist: dist/jwbackup-<version>.tar.gz, the source tarball the ebuild unpacks
dist:
	mkdir -p dist
	git archive --format=tar.gz --prefix=jwbackup-$(VERSION)/ -o dist/jwbackup-$(VERSION).tar.gz HEAD

## man: regenerate man/jwbackup.8 from the argument parser
man:
	$(PYTHON) tools/manpage.py > man/jwbackup.8.new
	mv man/jwbackup.8.new man/jwbackup.8

run-deps:
	$(call apt_install,$(RUN_DEBS))

build-deps:
	$(call apt_install,$(BUILD_DEBS))

test-deps:
	$(call apt_install,$(TEST_DEBS))

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt -e .
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info
