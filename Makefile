# Parley build. `make` builds every binary and test program into build/rel;
# `make test` rebuilds them with ASan+UBSan into build/san and runs the unit,
# integration and end-to-end suites against a real local stack.
#
# Sources are found by wildcard: a new file in libcommon/, services/<name>/,
# tools/<name>/ or tests/<suite>/ needs no edit here.
#
# The bus and store implementations are chosen at link time, not at run
# time: the microservice binaries link bus_kafka.o + store_mongo*.o (the
# "stack" archive), parleyd links bus_sqlite.o + store_sqlite.o (the
# "embedded" archive). Services see only bus.h / store.h either way, and no
# binary carries an implementation it can never use. parleyd is the five
# services' objects, each partially linked (ld -r) with every global symbol
# but its renamed main localized, so same-named helpers never clash.

CC      ?= cc
SAN     ?= 0
OUT     ?= $(if $(filter 1,$(SAN)),build/san,build/rel)
GEN     := build/gen

PKGS    := rdkafka libmicrohttpd libmongoc-1.0 jansson libprotobuf-c libcrypto sqlite3 libcurl zlib
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lwslay -lpthread -lm
CHECK_LIBS := $(shell pkg-config --libs check 2>/dev/null)

CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
           -fno-strict-aliasing -D_GNU_SOURCE -MMD -MP -Ilibcommon -I$(GEN) $(PKG_CFLAGS)
ifeq ($(SAN),1)
CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif

SERVICES := $(filter-out parleyd,$(patsubst services/%/main.c,%,$(wildcard services/*/main.c)))
TOOLS    := $(patsubst tools/%/main.c,%,$(wildcard tools/*/main.c))
PROTOS   := $(wildcard proto/*.proto)
PROTO_C  := $(patsubst proto/%.proto,$(GEN)/%.pb-c.c,$(PROTOS))
PROTO_H  := $(PROTO_C:.c=.h)

# The web client, embedded into libcommon (libcommon/web_assets.h).
WEB_FILES := $(wildcard web/*.html web/*.js web/*.css web/*.svg web/*.png)
WEB_C    := $(GEN)/web_assets_data.c

STACK_SRC := libcommon/bus_kafka.c $(wildcard libcommon/store_mongo*.c)
EMBED_SRC := libcommon/bus_sqlite.c libcommon/store_sqlite.c libcommon/sqldb.c
LIB_SRC  := $(filter-out $(STACK_SRC) $(EMBED_SRC),$(wildcard libcommon/*.c))
LIB_OBJ  := $(patsubst %.c,$(OUT)/%.o,$(LIB_SRC)) $(patsubst $(GEN)/%.c,$(OUT)/gen/%.o,$(PROTO_C) $(WEB_C))
LIB_STACK := $(OUT)/libparley-stack.a
LIB_EMBED := $(OUT)/libparley-embed.a
LIB      := $(LIB_STACK) $(OUT)/libcommon.a

SERVICE_BINS := $(addprefix $(OUT)/bin/,$(SERVICES))
TOOL_BINS    := $(addprefix $(OUT)/bin/,$(TOOLS))
TEST_SRC     := $(wildcard tests/unit/test_*.c tests/integration/test_*.c tests/e2e/test_*.c)
TEST_BINS    := $(patsubst %.c,$(OUT)/%,$(TEST_SRC))
BENCH_BINS   := $(patsubst bench/%.c,$(OUT)/bin/%,$(wildcard bench/*.c))
# The e2e programs once more, linked with parleyd's store, for the runs
# against parleyd (a test that looks into the store opens parleyd's file).
E2E_EMBED_BINS := $(patsubst tests/e2e/%.c,$(OUT)/tests/e2e-parleyd/%,$(wildcard tests/e2e/test_*.c))

# libFuzzer targets (fuzz/fuzz_<name>.c): clang, ASan+UBSan, coverage over
# all of libcommon; `make fuzz-build` builds them into build/fuzz with
# FUZZ=1 (docs/testing.md).
FUZZ_SECONDS ?= 60
ifeq ($(FUZZ),1)
CFLAGS  += -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer \
           -fno-sanitize-recover=undefined
endif

# Generated protobuf code and objects are kept, not treated as intermediates.
.SECONDARY:

.PHONY: all deps deps-build test test-unit test-parleyd test-browser test-chaos test-tls run run-stack stack-start stack-stop bench clean helm-check image test-k8s fuzz fuzz-build
.DEFAULT_GOAL := all

all: $(SERVICE_BINS) $(OUT)/bin/parleyd $(TOOL_BINS) $(TEST_BINS) $(E2E_EMBED_BINS) $(BENCH_BINS)

$(GEN)/%.pb-c.c $(GEN)/%.pb-c.h: proto/%.proto
	@mkdir -p $(GEN)
	protoc-c --proto_path=proto --c_out=$(GEN) $<

# web/ itself is a prerequisite so that removing a file regenerates too.
$(WEB_C): web/embed.sh web $(WEB_FILES)
	@mkdir -p $(GEN)
	bash web/embed.sh $@ $(WEB_FILES)

$(OUT)/gen/%.o: $(GEN)/%.c $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(OUT)/%.o: %.c $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(OUT)/libcommon.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(LIB_STACK): $(patsubst %.c,$(OUT)/%.o,$(STACK_SRC))
	@rm -f $@
	ar rcs $@ $^

$(LIB_EMBED): $(patsubst %.c,$(OUT)/%.o,$(EMBED_SRC))
	@rm -f $@
	ar rcs $@ $^

# parleyd: each service as one relocatable object whose only global is
# <service>_main (dashes become underscores).
define embed_rule
$(OUT)/parleyd/$(1).o: $(patsubst %.c,$(OUT)/%.o,$(wildcard services/$(1)/*.c))
	@mkdir -p $$(dir $$@)
	ld -r -o $$@.tmp $$^
	objcopy --redefine-sym main=$(subst -,_,$(1))_main $$@.tmp $$@.tmp2
	objcopy --keep-global-symbol=$(subst -,_,$(1))_main $$@.tmp2 $$@
	@rm -f $$@.tmp $$@.tmp2
endef
$(foreach s,$(SERVICES),$(eval $(call embed_rule,$(s))))

$(OUT)/bin/parleyd: $(patsubst %.c,$(OUT)/%.o,$(wildcard services/parleyd/*.c)) \
                    $(addprefix $(OUT)/parleyd/,$(addsuffix .o,$(SERVICES))) \
                    $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

# One binary per folder under services/ and tools/.
define prog_rule
$(OUT)/bin/$(1): $(patsubst %.c,$(OUT)/%.o,$(wildcard $(2)/$(1)/*.c)) $(LIB)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(LDFLAGS) -o $$@ $$^ $$(PKG_LIBS)
endef
$(foreach s,$(SERVICES),$(eval $(call prog_rule,$(s),services)))
$(foreach t,$(TOOLS),$(eval $(call prog_rule,$(t),tools)))

$(OUT)/bin/fuzz_%: $(OUT)/fuzz/fuzz_%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) -fsanitize=fuzzer,address,undefined -o $@ $^ $(PKG_LIBS)

# The WebSocket connection target runs a whole gateway, linked as parleyd
# links it, over the embedded bus.
$(OUT)/bin/fuzz_wsconn: $(OUT)/fuzz/fuzz_wsconn.o $(OUT)/parleyd/gateway.o $(LIB_EMBED) \
                        $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) -fsanitize=fuzzer,address,undefined -o $@ $^ $(PKG_LIBS)

$(OUT)/bin/%: $(OUT)/bench/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

# End-to-end programs share the process harness.
$(OUT)/tests/e2e/test_%: $(OUT)/tests/e2e/test_%.o $(OUT)/tests/e2e/harness.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

$(OUT)/tests/e2e-parleyd/test_%: $(OUT)/tests/e2e/test_%.o $(OUT)/tests/e2e/harness.o \
                                 $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# One store contract suite (store_contract.c), run by one program per
# implementation, each linked with its own.
$(OUT)/tests/integration/test_store_mongo: $(OUT)/tests/integration/test_store_mongo.o \
        $(OUT)/tests/integration/store_contract.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

$(OUT)/tests/integration/test_store_sqlite: $(OUT)/tests/integration/test_store_sqlite.o \
        $(OUT)/tests/integration/store_contract.o $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

$(OUT)/tests/integration/test_bus_sqlite $(OUT)/tests/integration/test_wal_sqlite: \
        $(OUT)/tests/integration/%: $(OUT)/tests/integration/%.o $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# presence's own code (its parleyd object: the unchanged main as
# presence_main) driven by the test over the embedded bus and store.
$(OUT)/tests/integration/test_presence_sqlite: $(OUT)/tests/integration/test_presence_sqlite.o \
        $(OUT)/parleyd/presence.o $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# The same for receipt (receipt_main).
$(OUT)/tests/integration/test_receipt_sqlite: $(OUT)/tests/integration/test_receipt_sqlite.o \
        $(OUT)/parleyd/receipt.o $(LIB_EMBED) $(OUT)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# The kept rests of sync scans, message-store's own module, alone.
$(OUT)/tests/unit/test_synckept: $(OUT)/tests/unit/test_synckept.o \
        $(OUT)/services/message-store/synckept.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# The write-behind gate and its held events, message-store's own module, alone.
$(OUT)/tests/unit/test_putgate: $(OUT)/tests/unit/test_putgate.o \
        $(OUT)/services/message-store/putgate.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# The acks waiting for their events, shared by the acker and its late
# thread, message-store's own module, alone.
$(OUT)/tests/unit/test_ackwait: $(OUT)/tests/unit/test_ackwait.o \
        $(OUT)/services/message-store/ackwait.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# The acker's kept device lists, message-store's own module, alone
# (devices.o decides coverage; its store calls are not reached).
$(OUT)/tests/unit/test_devcache: $(OUT)/tests/unit/test_devcache.o \
        $(OUT)/services/message-store/devcache.o $(OUT)/services/message-store/devices.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

# service.o (in libcommon.a) calls the bus and the store, whose archive
# comes first in $(LIB): this test, which reaches them only through it,
# names libcommon.a before them too ($+ keeps the repeat).
$(OUT)/tests/unit/test_service: $(OUT)/tests/unit/test_service.o $(OUT)/libcommon.a $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $+ $(CHECK_LIBS) $(PKG_LIBS)

$(OUT)/tests/%: $(OUT)/tests/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

deps:
	@bash deploy/local/deps.sh

# The whole suite: sanitized build, real Kafka + MongoDB-wire server started
# and stopped by tests/run.sh (also on failure).
test: deps
	$(MAKE) SAN=1 all
	$(MAKE) fuzz-build
	bash tests/run.sh build/san

test-unit:
	$(MAKE) SAN=1 all
	$(MAKE) fuzz-build
	bash tests/run.sh build/san unit

# The MongoDB store's integration tests and the end-to-end suite with every
# service reaching Kafka through SASL_SSL and FerretDB through TLS
# (certificates from a throwaway CA: stack.sh --tls); by hand, not in make
# test. test_bus_kafka is left out: its own raw librdkafka clients (offset
# checks) speak plaintext.
test-tls: deps
	$(MAKE) SAN=1 all
	PARLEY_TEST_TLS=1 PARLEY_TEST_ONLY='tests/(integration/test_store_mongo[a-z_]*|e2e/test_[a-z_]+ \[stack\])$$' \
	  bash tests/run.sh build/san

# Every fuzz target for FUZZ_SECONDS (60) each; `make test` runs each for a
# few seconds (PARLEY_FUZZ_SECONDS, 4).
fuzz: deps fuzz-build
	bash fuzz/run.sh build/fuzz $(FUZZ_SECONDS)

fuzz-build:
	$(MAKE) CC=clang FUZZ=1 OUT=build/fuzz $(patsubst fuzz/%.c,build/fuzz/bin/%,$(wildcard fuzz/fuzz_*.c))

# Unit tests and the end-to-end suite against parleyd: no Kafka, no MongoDB.
test-parleyd:
	$(MAKE) SAN=1 all
	$(MAKE) fuzz-build
	bash tests/run.sh build/san parleyd

# Only the web client's browser tests (with the stack they need).
test-browser: deps
	$(MAKE) SAN=1 all
	bash tests/run.sh build/san browser

# The embedded default: one process, data in ./data/, no Kafka or MongoDB.
# Builds parleyd and the tools (parleyctl), not the tests and benchmarks.
run: deps-build
	$(MAKE) $(OUT)/bin/parleyd $(TOOL_BINS)
	bash deploy/local/run.sh build/rel

deps-build:
	@bash deploy/local/deps.sh build

# The microservice mode: local Kafka + MongoDB-wire server and five binaries.
run-stack: deps
	$(MAKE) $(SERVICE_BINS) $(TOOL_BINS)
	bash deploy/local/run-stack.sh build/rel

stack-start:
	bash deploy/local/stack.sh start
stack-stop:
	bash deploy/local/stack.sh stop

# Issue 16's fault matrix under load on a three-broker stack of its own
# (tests/chaos/run.sh; CHAOS_FAULTS picks faults, default all of them; about
# 30-45 minutes on a busy 2-core box). `make test` runs a short version (docs/high-availability.md).
test-chaos: deps
	$(MAKE) $(SERVICE_BINS) $(BENCH_BINS)
	bash tests/chaos/run.sh $(OUT) $${CHAOS_FAULTS:-}

bench: deps all
	@bash deploy/local/deps.sh bench
	bash bench/run.sh build/rel

# The container image (deploy/docker/Dockerfile) with podman or docker; the
# Debian base images are made locally when no registry serves them.
image:
	bash deploy/docker/image.sh

# The chart on a real one-node Kubernetes (tests/k8s/test.sh): the cluster
# binaries built from the Go module proxy into ~/.cache/parley on the first
# run (15 min and more), the image of `make image`, etcd and containerd from
# Debian, all in a network namespace of its own. On demand, as root; not
# part of `make test` (docs/deploy.md, "On a real cluster").
test-k8s: image
	bash deploy/local/deps.sh k8s
	bash tests/k8s/test.sh

# Offline checks of the Helm chart (lint, template, refused values, and the
# Kubernetes schemas when kubernetes-validate is installed). Not part of
# `make test`: helm is not a build dependency; skips when it is missing.
helm-check:
	bash helm/check.sh

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)
