# keel: `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
export PATH := /usr/local/go/bin:$(PATH)
DATA ?= $(CURDIR)/data
FUZZTIME ?= 60
TESTFLAGS ?=

.PHONY: help build deps test test-unit test-kernel fuzz run serve bench bench-repl bench-deps vet clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build the static binary bin/keel
	CGO_ENABLED=0 $(GO) build -o bin/keel .

deps: ## install the Debian packages and Go modules the tests need (only what is missing)
	./scripts/test-deps.sh
	$(GO) mod download

vet: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

test: deps build vet test-unit test-kernel ## install what is missing, then run every test (unit, race, fuzz seeds, real clients, kernel)
	@echo "make test: all passed"

test-unit: build ## go tests with -race, then each fuzz target briefly
	KEEL_BIN=$(CURDIR)/bin/keel $(GO) test -race -timeout 20m $(TESTFLAGS) ./...
	./scripts/fuzz.sh 3

test-kernel: build ## boot a Debian kernel in qemu and test keel against the kernel NBD client
	@if [ -x scripts/kernel-test/run.sh ]; then ./scripts/kernel-test/run.sh; else echo "test-kernel: scripts/kernel-test/run.sh missing"; exit 1; fi

fuzz: ## run each fuzz target for FUZZTIME seconds (default 60)
	./scripts/fuzz.sh $(FUZZTIME)

run: build ## start a one-machine cluster (coordinator + 3 nodes, a replicated 4 GiB volume) and print how to use it
	./bin/keel up --nodes 3 --replicas 2 --size 4G --data-dir $(DATA)/up

serve: build ## serve one standalone volume on 127.0.0.1:10809 (no coordinator, no replication)
	@mkdir -p $(DATA)
	@echo "keel: serving $(DATA)/default.vol (4 GiB) as export 'default' on nbd://127.0.0.1:10809; Ctrl-C stops it cleanly"
	./bin/keel serve --file $(DATA)/default.vol --size 4G --listen 127.0.0.1:10809 --name default --metrics 127.0.0.1:9109

bench-deps: ## install the peer servers the benchmarks compare against
	./scripts/bench-deps.sh

bench: build ## run the default fio suite: keel, its peers and the raw disk; writes bench/results/latest.{json,svg}
	./bin/keel bench fio --out bench/results

bench-repl: build ## replicated (2 replicas) vs unreplicated 4 KiB writes and the two-volume ceiling, side by side (about 6 min); writes bench/results/repl-latest.{json,md}
	./bin/keel bench repl --runtime 10s --reps 2

clean: ## remove built files (not data/)
	rm -rf bin
