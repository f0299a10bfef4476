# cafe-gateway developer commands; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
KAFKA := deploy/kafka/kafka.sh
REDIS := deploy/redis/redis.sh
DEV := .dev
PYTEST_ARGS ?= -v

export CAFE_KAFKA_PORT ?= 9092
export CAFE_REDIS_PORT ?= 6390
export CAFE_KEYS_FILE ?= $(DEV)/keys.json

# With CAFE_KAFKA_BOOTSTRAP set, run and test use that cluster and start nothing;
# otherwise they start (or reuse) the local broker from deploy/kafka/.
define kafka_for_run
	@if [ -n "$$CAFE_KAFKA_BOOTSTRAP" ]; then \
		echo "using Kafka at $$CAFE_KAFKA_BOOTSTRAP"; \
	else \
		$(KAFKA) up; \
	fi
endef
BOOTSTRAP := $${CAFE_KAFKA_BOOTSTRAP:-127.0.0.1:$(CAFE_KAFKA_PORT)}

# The same for the Redis of the rate-limit tests: with CAFE_TEST_REDIS_URL set, test
# uses that Redis and starts nothing; otherwise it starts (or reuses) deploy/redis/.
# `make run` needs no Redis: the gateway's limits are local unless configured otherwise.
define redis_for_test
	@if [ -n "$$CAFE_TEST_REDIS_URL" ]; then \
		echo "using Redis at $$CAFE_TEST_REDIS_URL"; \
	else \
		$(REDIS) up; \
	fi
endef
REDIS_URL := $${CAFE_TEST_REDIS_URL:-redis://127.0.0.1:$(CAFE_REDIS_PORT)/0}

.PHONY: help install run test test-cluster test-model bench loadtest lint fmt kafka-up kafka-down kafka-status \
	redis-up redis-down redis-status lock clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: $(INSTALLED) ## create .venv and install the gateway and its dev tools (pinned)

$(DEV)/api-key: | $(INSTALLED)
	@mkdir -p $(DEV)
	@umask 077 && $(BIN)/cafe-gateway keys --keys-file $(CAFE_KEYS_FILE) \
		create --platform analytics-portal >$@.tmp && mv $@.tmp $@

run: $(INSTALLED) $(DEV)/api-key ## start Kafka and the gateway on 127.0.0.1:8080 (Ctrl-C stops the gateway)
	$(kafka_for_run)
	@echo "development API key (kept in $(DEV)/api-key): $$(cat $(DEV)/api-key)"
	@# The spool keeps records on disk while Kafka is away (CAFE_SPOOL_DIR= turns it off).
	CAFE_KAFKA_BOOTSTRAP=$(BOOTSTRAP) CAFE_SPOOL_DIR=$${CAFE_SPOOL_DIR-$(DEV)/spool} \
		$(BIN)/cafe-gateway serve

test: $(INSTALLED) ## run the whole test suite, integration tests against a real Kafka and Redis
	@bash tests/system-packages.sh
	$(kafka_for_run)
	$(redis_for_test)
	CAFE_KAFKA_BOOTSTRAP=$(BOOTSTRAP) CAFE_TEST_REDIS_URL=$(REDIS_URL) $(BIN)/pytest $(PYTEST_ARGS)

test-cluster: $(INSTALLED) ## only the tests that start their own 3-broker Kafka cluster (a few minutes)
	$(BIN)/pytest -m cluster $(PYTEST_ARGS)

MODEL_EXAMPLES ?= 5000
MODEL_STEPS ?= 50
test-model: $(INSTALLED) ## the spool's model-based test, long and with new random choices (MODEL_EXAMPLES, MODEL_STEPS)
	CAFE_MODEL_EXAMPLES=$(MODEL_EXAMPLES) CAFE_MODEL_STEPS=$(MODEL_STEPS) CAFE_MODEL_RANDOM=1 \
		$(BIN)/pytest tests/test_spool_model.py $(PYTEST_ARGS)

BENCH_SECONDS ?= 10
WORKERS ?= 1
PEERS ?=
SESSIONS ?=
bench: $(INSTALLED) ## measure the gateway on the local Kafka against its ceilings, then tracing's cost (WORKERS=N; PEERS=1: and the peer bridges; SESSIONS=N: sessionIds, 1000000 by default)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } || \
		{ echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(kafka_for_run)
	@# The limits run compares local limits with Redis-backed ones (loadtest/bench.py).
	@[ -n "$$CAFE_BENCH_REDIS_URL" ] || $(REDIS) up
	CAFE_KAFKA_BOOTSTRAP=$(BOOTSTRAP) $(BIN)/python -m loadtest.bench \
		--seconds $(BENCH_SECONDS) --workers $(WORKERS) $(if $(PEERS),--peer) \
		$(if $(SESSIONS),--sessions $(SESSIONS))
	@# Tracing's cost: W1 off, at ratio 0.01 and at 1, in turns (loadtest/tracebench.py).
	CAFE_KAFKA_BOOTSTRAP=$(BOOTSTRAP) $(BIN)/python -m loadtest.tracebench \
		--rounds 3 --seconds $(BENCH_SECONDS)

LOADTEST_HOST ?= http://127.0.0.1:8080
LOADTEST_USERS ?= 20
LOADTEST_TIME ?= 1m
LOADTEST_OUT := loadtest/results

loadtest: $(INSTALLED) ## load-test a running gateway with Locust (LOADTEST_HOST, _USERS, _TIME)
	@mkdir -p $(LOADTEST_OUT)
	CAFE_LOADTEST_KEY=$${CAFE_LOADTEST_KEY:-$$(cat $(DEV)/api-key)} $(BIN)/locust \
		-f loadtest/locustfile.py --headless --host $(LOADTEST_HOST) \
		--users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_USERS) --run-time $(LOADTEST_TIME) \
		--csv $(LOADTEST_OUT)/locust --html $(LOADTEST_OUT)/locust.html

lint: $(INSTALLED) ## ruff check, ruff format --check, mypy, the docs site (edits nothing)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@# --strict fails on a broken link or anchor and on a page left out of nav; not with
	@# --quiet, which hides the warnings from --strict too. The site goes to the ignored .dev/.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DEV)/site

fmt: $(INSTALLED) ## format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

kafka-up: ## start the local Kafka on 127.0.0.1:$CAFE_KAFKA_PORT (first run fetches jars)
	$(KAFKA) up

kafka-down: ## stop the local Kafka
	$(KAFKA) down

kafka-status: ## say whether the local Kafka runs
	$(KAFKA) status

redis-up: ## start the local Redis on 127.0.0.1:$CAFE_REDIS_PORT (apt-get install redis-server)
	$(REDIS) up

redis-down: ## stop the local Redis
	$(REDIS) down

redis-status: ## say whether the local Redis runs
	$(REDIS) status

lock: ## re-resolve the newest allowed dependency versions into constraints.txt
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q '.[dev,bench]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^cafe-gateway' >constraints.txt
	rm -rf .venv-lock

clean: ## remove .venv and caches (the Kafka cache and data stay; see kafka.sh)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
