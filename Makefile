# Parley build. `make` builds every binary and test program into build/rel;
# `make test` rebuilds them with ASan+UBSan into build/san and runs the unit,
# integration and end-to-end suites against a real local stack.
#
# Sources are found by wildcard: a new file in libcommon/, services/<name>/,
# tools/<name>/ or tests/<suite>/ needs no edit here.

CC      ?= cc
SAN     ?= 0
OUT     ?= $(if $(filter 1,$(SAN)),build/san,build/rel)
GEN     := build/gen

PKGS    := rdkafka libmicrohttpd libmongoc-1.0 jansson libprotobuf-c libcrypto sqlite3
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

SERVICES := $(patsubst services/%/main.c,%,$(wildcard services/*/main.c))
TOOLS    := $(patsubst tools/%/main.c,%,$(wildcard tools/*/main.c))
PROTOS   := $(wildcard proto/*.proto)
PROTO_C  := $(patsubst proto/%.proto,$(GEN)/%.pb-c.c,$(PROTOS))
PROTO_H  := $(PROTO_C:.c=.h)

# The web client, embedded into libcommon (libcommon/web_assets.h).
WEB_FILES := $(wildcard web/*.html web/*.js web/*.css web/*.svg web/*.png)
WEB_C    := $(GEN)/web_assets_data.c

LIB_SRC  := $(wildcard libcommon/*.c)
LIB_OBJ  := $(patsubst %.c,$(OUT)/%.o,$(LIB_SRC)) $(patsubst $(GEN)/%.c,$(OUT)/gen/%.o,$(PROTO_C) $(WEB_C))
LIB      := $(OUT)/libcommon.a

SERVICE_BINS := $(addprefix $(OUT)/bin/,$(SERVICES))
TOOL_BINS    := $(addprefix $(OUT)/bin/,$(TOOLS))
TEST_SRC     := $(wildcard tests/unit/test_*.c tests/integration/test_*.c tests/e2e/test_*.c)
TEST_BINS    := $(patsubst %.c,$(OUT)/%,$(TEST_SRC))
BENCH_BINS   := $(patsubst bench/%.c,$(OUT)/bin/%,$(wildcard bench/*.c))

# Generated protobuf code and objects are kept, not treated as intermediates.
.SECONDARY:

.PHONY: all deps test test-unit test-browser run stack-start stack-stop bench clean helm-check
.DEFAULT_GOAL := all

all: $(SERVICE_BINS) $(TOOL_BINS) $(TEST_BINS) $(BENCH_BINS)

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

$(LIB): $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# One binary per folder under services/ and tools/.
define prog_rule
$(OUT)/bin/$(1): $(patsubst %.c,$(OUT)/%.o,$(wildcard $(2)/$(1)/*.c)) $(LIB)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(LDFLAGS) -o $$@ $$^ $$(PKG_LIBS)
endef
$(foreach s,$(SERVICES),$(eval $(call prog_rule,$(s),services)))
$(foreach t,$(TOOLS),$(eval $(call prog_rule,$(t),tools)))

$(OUT)/bin/%: $(OUT)/bench/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

# End-to-end programs share the process harness.
$(OUT)/tests/e2e/test_%: $(OUT)/tests/e2e/test_%.o $(OUT)/tests/e2e/harness.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

$(OUT)/tests/%: $(OUT)/tests/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CHECK_LIBS) $(PKG_LIBS)

deps:
	@bash deploy/local/deps.sh

# The whole suite: sanitized build, real Kafka + MongoDB-wire server started
# and stopped by tests/run.sh (also on failure).
test: deps
	$(MAKE) SAN=1 all
	bash tests/run.sh build/san

test-unit:
	$(MAKE) SAN=1 all
	bash tests/run.sh build/san unit

# Only the web client's browser tests (with the stack they need).
test-browser: deps
	$(MAKE) SAN=1 all
	bash tests/run.sh build/san browser

run: deps all
	bash deploy/local/run.sh build/rel

stack-start:
	bash deploy/local/stack.sh start
stack-stop:
	bash deploy/local/stack.sh stop

bench: deps all
	bash bench/run.sh build/rel

# Offline checks of the Helm chart (lint, template, refused values, and the
# Kubernetes schemas when kubernetes-validate is installed). Not part of
# `make test`: helm is not a build dependency; skips when it is missing.
helm-check:
	bash helm/check.sh

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)
