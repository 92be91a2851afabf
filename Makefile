# kvmshell: see README.md.  Everything here runs as root.
PYTHON  ?= /usr/bin/python3
PREFIX  ?= /usr/local
SBIN    := $(PREFIX)/sbin
BIN     := $(PREFIX)/bin
LIBEXEC := $(PREFIX)/libexec/kvmshell
CONF    := /etc/kvmshell
PIP     := $(PYTHON) -m pip install --break-system-packages --disable-pip-version-check -q

APT_RUNTIME := qemu-system-x86 qemu-utils python3 python3-pip sudo iproute2 openssh-server \
               openssh-client libpam-modules socat
APT_TEST    := busybox-static cpio kmod pamtester iputils-ping procps login passwd util-linux \
               xz-utils zstd
PIP_RUNTIME := python-pam pyroute2 pexpect qemu.qmp
PIP_TEST    := pytest hypothesis mypy vncdotool atheris import-linter pyflakes
# vncdotool's twisted needs service_identity, and a pyOpenSSL that matches
# pip's cryptography (Debian's python3-openssl, if present, does not).
PIP_TEST_UPGRADE := pyopenssl service_identity

.PHONY: all deps test-deps install install-files demo guest test typecheck bench fuzz clean debian-guest

all:
	@echo "targets: install demo test typecheck bench fuzz"

deps:
	@missing=$$(for p in $(APT_RUNTIME); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PIP) $(PIP_RUNTIME)

test-deps: deps
	@missing=$$(for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PIP) $(PIP_TEST)
	$(PIP) --upgrade $(PIP_TEST_UPGRADE)

# install and demo end with `kvmadm check` (virt-host-validate's checks for
# kvmshell): WARNs are shown and do not stop make; a FAIL makes the target
# fail after everything is installed, since kvmshell would not work, or not
# be safe, on this host until it is fixed.
CHECK = $(SBIN)/kvmadm check || { echo "make: kvmshell is installed, but kvmadm check found a FAIL (above): fix it, then run kvmadm check again" >&2; exit 1; }

install: install-files
	@$(CHECK)

install-files: deps
	# setuptools reuses build/lib: a module moved or removed since the last
	# build would otherwise be installed again.
	rm -rf build/lib build/bdist.*
	$(PIP) --no-deps --no-build-isolation --upgrade .
	install -d -m 755 $(BIN) $(SBIN) $(LIBEXEC) $(CONF)
	install -m 755 bin/kvmshell $(BIN)/kvmshell
	install -m 755 bin/kvmshell-vncviewer $(BIN)/kvmshell-vncviewer
	install -m 755 bin/kvmadm $(SBIN)/kvmadm
	$(PYTHON) -I -m kvmshell.admin.install $(LIBEXEC) >/dev/null
	mkdir -p build
	sed 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' sudoers.d/kvmshell > build/sudoers.kvmshell
	visudo -cf build/sudoers.kvmshell
	install -m 440 build/sudoers.kvmshell /etc/sudoers.d/kvmshell
	rm -f $(BIN)/kvmadm
	test -e $(CONF)/kvmshell.conf || { sed -e 's|/usr/local/bin/kvmshell|$(BIN)/kvmshell|' \
	  -e 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' \
	  kvmshell.conf > $(CONF)/kvmshell.conf && chmod 644 $(CONF)/kvmshell.conf; }
	grep -qx $(BIN)/kvmshell /etc/shells || echo $(BIN)/kvmshell >> /etc/shells
	getent group kvmusers >/dev/null || groupadd --system kvmusers
	install -d -m 755 $(CONF)/authorized_keys /etc/ssh/sshd_config.d
	sed 's|/usr/local/bin/kvmshell|$(BIN)/kvmshell|' sshd_config.d/kvmshell.conf > /etc/ssh/sshd_config.d/kvmshell.conf
	chmod 644 /etc/ssh/sshd_config.d/kvmshell.conf
	install -m 644 pam/kvmshell /etc/pam.d/kvmshell
	@if [ -x /usr/sbin/sshd ]; then mkdir -p /run/sshd; /usr/sbin/sshd -t || { \
	  rm -f /etc/ssh/sshd_config.d/kvmshell.conf; \
	  echo "sshd -t failed with the kvmshell drop-in: not installed"; exit 1; }; fi
	@if [ -d /run/systemd/system ] && systemctl is-active -q ssh 2>/dev/null; then systemctl reload ssh; fi

guest:
	tests/guest/build-guest.sh build/guest

demo: install-files guest
	sh demo/demo.sh
	@$(CHECK)

test: install test-deps guest
	$(PYTHON) -m pytest -v tests

# Coverage-guided fuzzing of the parser for a fixed time; any exception
# other than a refusal is a finding (and a non-zero exit).
FUZZ_SECONDS ?= 60
fuzz:
	@mkdir -p build/fuzz-corpus
	@$(PIP) atheris
	@$(PYTHON) tests/fuzz/fuzz_parser.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  -dict=tests/fuzz/parser.dict build/fuzz-corpus >build/fuzz.log 2>&1 \
	  || { tail -40 build/fuzz.log; echo "fuzz: FINDING (see build/fuzz.log)"; exit 1; }
	@grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' build/fuzz.log
	@echo "fuzz: no finding in $(FUZZ_SECONDS) s"

typecheck:
	$(PYTHON) -m mypy --strict kvmshell

bench: install guest
	$(PYTHON) bench/run.py

clean:
	rm -rf build *.egg-info

# A real Debian 12 guest (qcow2 root disk, cloud kernel, initramfs), cached in
# build/debian; see tests/guest/build-debian.sh and tests/debianrig.py.
debian-guest:
	tests/guest/build-debian.sh build/debian
