# iapd build, run and test entry points. See README.md.

GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X iapd/internal/cli.Version=$(VERSION)
CONFIG ?= config.example.yaml

.PHONY: all setup build run test vet bench clean

all: build

# setup installs the Debian packages the build and tests need (idempotent).
setup:
	./scripts/setup-debian.sh

build: setup
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/iapd ./cmd/iapd

# run builds iapd and serves $(CONFIG) in the foreground; Ctrl-C stops it.
run: build
	./bin/iapd run -c $(CONFIG)

vet:
	$(GO) vet ./...

# test runs every test. As root, the network namespace tests run too;
# with CI=true they must run, and a skip fails the build.
test: setup vet
	$(GO) test -count=1 -timeout 8m ./...

# bench measures iapd against direct connections on loopback; see
# bench/README.md. BENCHFLAGS=-quick gives a run of about 30 s.
bench: build
	$(GO) run ./bench/iapdbench -iapd bin/iapd -out bench/out $(BENCHFLAGS)

clean:
	rm -rf bin
