# iapd build, run and test entry points. See README.md.

GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X iapd/internal/cli.Version=$(VERSION)
CONFIG ?= config.example.yaml

FUZZTIME ?= 1m

.PHONY: all setup setup-test setup-bench build run bed test vet fuzz soak bench clean install

all: build

# setup installs the Debian packages the build needs; setup-test adds
# those the tests need. Both are idempotent.
setup:
	./scripts/setup-debian.sh

setup-test:
	./scripts/setup-debian.sh test

build: setup
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/iapd ./cmd/iapd

# run builds iapd and serves $(CONFIG) in the foreground; Ctrl-C stops it.
run: build
	./bin/iapd run -c $(CONFIG)

# bed (as root) builds the network namespaces of the end-to-end tests,
# runs iapd in them with a ready policy and prints what to try in other
# terminals; Ctrl-C removes everything. See docs/cookbook.md.
bed: build
	$(GO) build -o bin/iapd-bed ./internal/testbed/cmd/iapd-bed
	./bin/iapd-bed -iapd bin/iapd

vet:
	$(GO) vet ./...

# test runs every test, then each fuzz test for 5 s. As root, the network
# namespace tests run too, the short soak test among them; with CI=true
# they must run, and a skip fails the build.
test: setup-test vet
	$(GO) test -count=1 -timeout 8m ./...
	GO=$(GO) ./scripts/fuzz.sh 5s

# fuzz runs each fuzz test for FUZZTIME (default 1m); see docs/soak.md.
fuzz:
	GO=$(GO) ./scripts/fuzz.sh $(FUZZTIME)

# soak runs the long soak test (as root, about 4 minutes): thousands of
# clients through iapd in network namespaces while links flap. Its
# figures go to bin/soak-report.txt; see docs/soak.md.
soak: setup-test
	mkdir -p bin
	CI=true IAPD_SOAK=long IAPD_SOAK_REPORT=$(CURDIR)/bin/soak-report.txt \
		$(GO) test -count=1 -timeout 20m -run '^TestPrivilegedSoak$$' -v ./cmd/iapd

# bench measures iapd against direct connections and against other SOCKS5
# proxies (microsocks; Dante too when dante-server is installed) on
# loopback; see bench/README.md. BENCHFLAGS=-quick gives a shorter run.
setup-bench:
	./scripts/setup-debian.sh bench

bench: build setup-bench
	$(GO) run ./bench/iapdbench -iapd bin/iapd -out bench/out $(BENCHFLAGS)

# install puts iapd where deploy/iapd.service expects it, installs the unit
# and, when there is none yet, the example policy as /etc/iapd/iapd.yaml,
# without the lines that let the quick start reach a server on loopback.
# It creates the system user and group iapd that the service runs as, unless
# DESTDIR is set (packaging). Then: systemctl daemon-reload && systemctl
# enable --now iapd
PREFIX ?= /usr/local
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
install: build
	install -D -m 0755 bin/iapd $(DESTDIR)$(PREFIX)/bin/iapd
	install -d -m 0755 $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's|/usr/local/|$(PREFIX)/|g' deploy/iapd.service > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/iapd.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/iapd.service
	install -d -m 0755 $(DESTDIR)$(PREFIX)/share/doc/iapd
	install -m 0644 README.md config.example.yaml $(DESTDIR)$(PREFIX)/share/doc/iapd/
	cp -R docs $(DESTDIR)$(PREFIX)/share/doc/iapd/
	if [ -z "$(DESTDIR)" ] && ! getent passwd iapd >/dev/null; then \
		useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin iapd; \
	fi
	install -d -m 0750 $(DESTDIR)/etc/iapd
	if [ ! -e $(DESTDIR)/etc/iapd/iapd.yaml ]; then \
		sed '/allow_local_targets: true # quick start$$/d' config.example.yaml > $(DESTDIR)/etc/iapd/iapd.yaml; \
		chmod 0640 $(DESTDIR)/etc/iapd/iapd.yaml; \
	fi
	if [ -z "$(DESTDIR)" ]; then chgrp iapd /etc/iapd /etc/iapd/iapd.yaml; fi

clean:
	rm -rf bin
