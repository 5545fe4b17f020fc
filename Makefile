# seedkeeper: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
SEEDKEEPER ?= target/debug/seedkeeper
# The database of every target: DB=name, else the one DATABASE_URL names (postgres://…/mydb),
# else seedkeeper (scripts/local-db.sh decides; `scripts/local-db.sh db` prints it).
DB ?=

.PHONY: help demo test db-reset-fast dev dev-stack keycloak plan bench bench-keycloak bench-events lint check-deploy build docker-setup image image-test stack-test

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

build: ## build the binary (debug)
	cargo build --quiet

demo: build ## seed a local database from the embedded dev realm, then show the evidence
	@url="$$(scripts/local-db.sh ensure $(DB))"; \
	SEEDKEEPER_DATABASE__URL="$$url" $(SEEDKEEPER) --once && \
	SEEDKEEPER_DATABASE__URL="$$url" $(SEEDKEEPER) status

test: ## run the test suite against a real PostgreSQL and a real Keycloak 26
	bash scripts/test.sh

db-reset-fast: build ## drop and recreate the local database, then seed it once (realm-file source)
	@start=$$(date +%s%N); url="$$(scripts/local-db.sh reset $(DB))"; \
	SEEDKEEPER_DATABASE__URL="$$url" SEEDKEEPER_IDENTITY__SOURCE=realm-file $(SEEDKEEPER) --once; \
	code=$$?; ms=$$(( ($$(date +%s%N) - start) / 1000000 )); echo "db-reset-fast: $${ms} ms (exit $$code)"; exit $$code

dev: build ## run the daemon against the local database, reconciling every 30 s
	url="$$(scripts/local-db.sh ensure $(DB))"; \
	SEEDKEEPER_DATABASE__URL="$$url" SEEDKEEPER_SCHEDULE__CRON="*/30 * * * * *" $(SEEDKEEPER) run

dev-stack: build ## the compose stack without Docker: PostgreSQL, the real Keycloak 26 with the dev realm, the daemon
	bash scripts/dev-stack.sh

keycloak: ## start the real Keycloak 26 alone (dev realm imported); prints its URL; stop with scripts/keycloak.sh stop
	bash scripts/keycloak.sh start

plan: build ## what a reconcile would change in the local database
	SEEDKEEPER_DATABASE__URL="$$(scripts/local-db.sh ensure $(DB))" $(SEEDKEEPER) plan

bench: ## the benchmark (release build, emulator sizes, then the real Keycloak; see docs/benchmark.md)
	bash scripts/bench.sh

bench-keycloak: ## only the benchmark against a real Keycloak 26 (10k and 50k users; see docs/benchmark.md)
	bash scripts/bench-keycloak.sh

bench-events: ## the event follower's figures: latency, idle requests, one user vs a full run (see docs/benchmark.md)
	bash scripts/bench-events.sh

lint: ## the docs check, formatting, module circles and clippy, as CI runs them
	python3 scripts/check-docs.py
	cargo fmt --check
	python3 scripts/module-graph.py --fail-on-circles
	python3 scripts/module-graph.py --top --fail-on-circles
	cargo clippy --all-targets -- -D warnings

check-deploy: ## checks of the compose file, manifests, systemd unit and Dockerfile (builds the image when Docker runs)
	bash scripts/check-deploy.sh

docker-setup: ## Docker engine, Compose v2 and the base images (stand-ins where no registry answers; root)
	bash scripts/docker-setup.sh

image: ## build the image seedkeeper:dev with its version and revision labels
	bash scripts/image-build.sh

image-test: image ## the built image: --help, config, secure default (exit 78, nothing written)
	bash scripts/image-test.sh

stack-test: image ## the compose stack end to end on Docker: up, converge, events, once, postgres restart, down
	bash scripts/stack-test.sh
