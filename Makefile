# kvmshell: see README.md.  Everything here runs as root.
PYTHON  ?= /usr/bin/python3
PREFIX  ?= /usr/local
SBIN    := $(PREFIX)/sbin
BIN     := $(PREFIX)/bin
LIBEXEC := $(PREFIX)/libexec/kvmshell
SHARE   := $(PREFIX)/share/kvmshell
CONF    := /etc/kvmshell
UNITDIR := /etc/systemd/system
MAN     := $(PREFIX)/share/man
BASHCOMP := $(PREFIX)/share/bash-completion/completions
PIP     := $(PYTHON) -m pip install --break-system-packages --disable-pip-version-check -q

APT_RUNTIME := qemu-system-x86 qemu-utils python3 python3-pip sudo iproute2 openssh-server \
               openssh-client libpam-modules socat ovmf util-linux man-db \
               python3-yaml
# Build: the man pages are made from the code's tables by docutils' rst2man.
APT_BUILD   := python3-docutils
APT_TEST    := munge busybox-static cpio kmod pamtester iputils-ping procps login passwd util-linux strace \
               xz-utils zstd groff-base systemd
PIP_RUNTIME := python-pam pyroute2 pexpect qemu.qmp starlette uvicorn websockets jinja2 \
               pycdlib
# The web front door's browser test: Debian's Chromium and its chromedriver
# (never a browser downloaded at install time); openssl for the proxy test.
APT_TEST    += chromium chromium-driver openssl
PIP_TEST    := pytest hypothesis mypy vncdotool atheris import-linter pyflakes selenium httpx \
               types-PyYAML
# vncdotool's twisted needs service_identity, and a pyOpenSSL that matches
# pip's cryptography (Debian's python3-openssl, if present, does not).
PIP_TEST_UPGRADE := pyopenssl service_identity

.PHONY: all deps test-deps install install-files man demo guest test typecheck bench fuzz clean \
        web-assets debian-guest

all:
	@echo "targets: install demo test typecheck bench fuzz"

deps:
	@missing=$$(for p in $(APT_RUNTIME) $(APT_BUILD); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PIP) $(PIP_RUNTIME)

test-deps: deps
	@missing=$$(for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PIP) $(PIP_TEST)
	$(PIP) --upgrade $(PIP_TEST_UPGRADE)

# kvmshell(1), kvmadm(8), kvmshell.conf(5): from the verb, option and
# command tables and the shipped kvmshell.conf (man/mkman.py).
man:
	$(PYTHON) man/mkman.py build/man >/dev/null

# install and demo end with `kvmadm check` (virt-host-validate's checks for
# kvmshell): WARNs are shown and do not stop make; a FAIL makes the target
# fail after everything is installed, since kvmshell would not work, or not
# be safe, on this host until it is fixed.
CHECK = $(SBIN)/kvmadm check || { echo "make: kvmshell is installed, but kvmadm check found a FAIL (above): fix it, then run kvmadm check again" >&2; exit 1; }

install: install-files
	@$(CHECK)

install-files: deps web-assets
	$(PYTHON) man/mkman.py build/man >/dev/null
	# setuptools reuses build/lib: a module moved or removed since the last
	# build would otherwise be installed again.
	rm -rf build/lib build/bdist.*
	$(PIP) --no-deps --no-build-isolation --upgrade .
	install -d -m 755 $(BIN) $(SBIN) $(LIBEXEC) $(CONF)
	install -m 755 bin/kvmshell $(BIN)/kvmshell
	install -m 755 bin/kvmshell-vncviewer $(BIN)/kvmshell-vncviewer
	install -m 755 bin/kvmshell-ssh-config $(BIN)/kvmshell-ssh-config
	install -m 755 bin/kvmadm $(SBIN)/kvmadm
	$(PYTHON) -I -m kvmshell.admin.install $(LIBEXEC) >/dev/null
	mkdir -p build
	sed 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' sudoers.d/kvmshell > build/sudoers.kvmshell
	visudo -cf build/sudoers.kvmshell
	install -m 440 build/sudoers.kvmshell /etc/sudoers.d/kvmshell
	# Several hosts on one tree (docs/multihost.md): the relay account (no
	# key until the admin writes /etc/kvmshell/relay/authorized_keys), its
	# sudoers rules and the directory of its shared ssh connections.
	getent passwd kvmrelay >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir / --shell /bin/sh --comment "kvmshell relay between hosts" kvmrelay
	install -d -m 755 $(CONF)/relay
	sed 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' sudoers.d/kvmshell-relay > build/sudoers.kvmshell-relay
	visudo -cf build/sudoers.kvmshell-relay
	install -m 440 build/sudoers.kvmshell-relay /etc/sudoers.d/kvmshell-relay
	rm -f $(BIN)/kvmadm
	test -e $(CONF)/kvmshell.conf || { sed -e 's|/usr/local/bin/kvmshell|$(BIN)/kvmshell|' \
	  -e 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' \
	  kvmshell.conf > $(CONF)/kvmshell.conf && chmod 644 $(CONF)/kvmshell.conf; }
	grep -qx $(BIN)/kvmshell /etc/shells || echo $(BIN)/kvmshell >> /etc/shells
	getent group kvmusers >/dev/null || groupadd --system kvmusers
	install -d -m 755 $(CONF)/authorized_keys $(CONF)/budgets $(CONF)/budgets/users \
	  $(CONF)/budgets/groups /etc/ssh/sshd_config.d
	sed 's|/usr/local/bin/kvmshell|$(BIN)/kvmshell|' sshd_config.d/kvmshell.conf > /etc/ssh/sshd_config.d/kvmshell.conf
	chmod 644 /etc/ssh/sshd_config.d/kvmshell.conf
	install -m 644 pam/kvmshell /etc/pam.d/kvmshell
	@if [ -x /usr/sbin/sshd ]; then mkdir -p /run/sshd; /usr/sbin/sshd -t || { \
	  rm -f /etc/ssh/sshd_config.d/kvmshell.conf; \
	  echo "sshd -t failed with the kvmshell drop-in: not installed"; exit 1; }; fi
	@if [ -d /run/systemd/system ] && systemctl is-active -q ssh 2>/dev/null; then systemctl reload ssh; fi
	# The web front door: installed and configured, but off (README: "The
	# web front door" says how to turn it on behind nginx).
	install -m 755 bin/kvmshell-web $(SBIN)/kvmshell-web
	getent passwd kvmweb >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir /nonexistent --shell /usr/sbin/nologin --comment "kvmshell web front door" kvmweb
	sed -e 's|/usr/local/libexec/kvmshell|$(LIBEXEC)|' -e 's|/usr/local/bin/kvmshell|$(BIN)/kvmshell|' \
	  sudoers.d/kvmshell-web > build/sudoers.kvmshell-web
	visudo -cf build/sudoers.kvmshell-web
	install -m 440 build/sudoers.kvmshell-web /etc/sudoers.d/kvmshell-web
	install -d -m 755 $(SHARE) $(UNITDIR)
	install -m 644 nginx/kvmshell-web.conf $(SHARE)/nginx-kvmshell-web.conf
	install -m 644 fail2ban/filter.d/kvmshell-web.conf $(SHARE)/fail2ban-filter-kvmshell-web.conf
	install -m 644 fail2ban/jail.d/kvmshell-web.conf.example $(SHARE)/fail2ban-jail-kvmshell-web.conf.example
	install -m 644 README.md SECURITY.md $(SHARE)/
	@if [ -d /etc/fail2ban/filter.d ]; then \
	  install -m 644 fail2ban/filter.d/kvmshell-web.conf /etc/fail2ban/filter.d/kvmshell-web.conf; fi
	sed -e 's|/usr/local/sbin/kvmshell-web|$(SBIN)/kvmshell-web|' -e 's|/usr/local/share/kvmshell|$(SHARE)|' \
	  systemd/kvmshell-web.service > $(UNITDIR)/kvmshell-web.service
	chmod 644 $(UNITDIR)/kvmshell-web.service
	# The socket's directory: kvmweb and the proxy's group only (made again
	# at each boot from /etc/tmpfiles.d).
	install -d -m 755 /etc/tmpfiles.d
	install -m 644 tmpfiles.d/kvmshell-web.conf /etc/tmpfiles.d/kvmshell-web.conf
	install -d -o kvmweb -g www-data -m 0750 /run/kvmshell-web
	install -m 644 tmpfiles.d/kvmshell-relay.conf /etc/tmpfiles.d/kvmshell-relay.conf
	install -d -o kvmrelay -g kvmrelay -m 0700 /run/kvmshell-relay
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	install -d -m 755 $(MAN)/man1 $(MAN)/man5 $(MAN)/man8 $(BASHCOMP) $(UNITDIR)
	install -m 644 build/man/kvmshell.1 $(MAN)/man1/kvmshell.1
	install -m 644 build/man/kvmadm.8 $(MAN)/man8/kvmadm.8
	install -m 644 build/man/kvmshell.conf.5 $(MAN)/man5/kvmshell.conf.5
	install -m 644 completion/kvmadm.bash $(BASHCOMP)/kvmadm
	sed 's|/usr/local/sbin/kvmadm|$(SBIN)/kvmadm|' systemd/kvmshell-autostart.service \
	  > $(UNITDIR)/kvmshell-autostart.service
	chmod 644 $(UNITDIR)/kvmshell-autostart.service
	@if command -v systemctl >/dev/null; then \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	  systemctl enable --quiet kvmshell-autostart.service 2>/dev/null || \
	    echo "note: enable autostart at boot with: systemctl enable kvmshell-autostart.service"; fi

guest:
	tests/guest/build-guest.sh build/guest

# The web pages' libraries (xterm.js, its fit addon, noVNC) from the npm
# registry, exactly as frontend/package-lock.json pins them (npm ci checks
# each package's integrity hash), copied into kvmshell/web/static/vendor/.
web-assets:
	@command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; }
	cd frontend && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	frontend/copy-assets.sh

demo: install-files guest
	sh demo/demo.sh
	@$(CHECK)

# fail2ban-regex for the web suite's test of the shipped filter, unpacked
# from Debian's package into build/ (not installed: no daemon is started).
FAIL2BAN_REGEX := build/fail2ban/usr/bin/fail2ban-regex
$(FAIL2BAN_REGEX):
	rm -rf build/fail2ban build/fail2ban-deb && mkdir -p build/fail2ban-deb
	cd build/fail2ban-deb && apt-get download -qq fail2ban 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq fail2ban; }
	dpkg -x build/fail2ban-deb/fail2ban_*.deb build/fail2ban && rm -rf build/fail2ban-deb

# nginx for the web suite's test of the shipped proxy example, unpacked the
# same way (installing Debian's package would start a daemon on port 80).
NGINX := build/nginx/usr/sbin/nginx
$(NGINX):
	rm -rf build/nginx build/nginx-deb && mkdir -p build/nginx-deb
	cd build/nginx-deb && apt-get download -qq nginx 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq nginx; }
	dpkg -x build/nginx-deb/nginx_*.deb build/nginx && rm -rf build/nginx-deb

test: install test-deps guest web-assets $(FAIL2BAN_REGEX) $(NGINX)
	$(PYTHON) -m pytest -v tests

# Coverage-guided fuzzing for a fixed time, FUZZ_SECONDS in all, split
# between the targets: the parser (start's grammar, the admin's, the VM
# identifier) and every verb's arguments end to end on a real tree.  Any
# exception other than a refusal is a finding (and a non-zero exit).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := parser verbs
fuzz:
	@$(PIP) atheris
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz-corpus-$$t; \
	  $(PYTHON) tests/fuzz/fuzz_$$t.py -max_total_time=$$(( $(FUZZ_SECONDS) / 2 )) \
	    -print_final_stats=1 -dict=tests/fuzz/$$t.dict build/fuzz-corpus-$$t \
	    >build/fuzz-$$t.log 2>&1 \
	  || { tail -40 build/fuzz-$$t.log; echo "fuzz: FINDING in $$t (see build/fuzz-$$t.log)"; exit 1; }; \
	  echo "fuzz $$t:"; \
	  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' build/fuzz-$$t.log; \
	done
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
