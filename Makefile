# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out
DEMO_SLOTS ?= 1000
DEMO_PORT ?= 50151
DEMO_METRICS_PORT ?= 9191

.PHONY: install demo test clean proto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch lies on disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Simulate held-out slots of the training mix and a drift condition and evaluate the shipped model
# offline; then serve it, stream the drift condition under its own context with genie feedback, ask
# the service to adapt to that context (the worker's default method, fine-tuning on the context's
# labelled slots, published as a version scoped to the context, judged by the default gate; the
# pool and index serve influence-guided jobs, `--method first-order`), and stream unseen slots of the target
# context and of a non-target context (training mix) before and after: the target's BER falls, the
# non-target context is still served by the global version and its BER does not change.
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/deeprx-client simulate --scenario train --slots $(DEMO_SLOTS) --seed 101 --out $(DEMO)/train-mix.h5
	$(BIN)/deeprx-client simulate --scenario drift-highspeed --slots $(DEMO_SLOTS) --seed 102 --out $(DEMO)/drift-highspeed.h5
	$(BIN)/deeprx-client simulate --scenario 'channel=TDL-A|TDL-B|TDL-C|TDL-D|TDL-E,speed=0:150,snr=5:25,dmrs=0:1' \
	    --slots 512 --seed 103 --out $(DEMO)/pool.h5
	$(BIN)/deeprx-client simulate --scenario drift-highspeed --slots 256 --seed 104 --out $(DEMO)/drift-check.h5
	$(BIN)/deeprx-client simulate --scenario train --slots 512 --seed 105 --out $(DEMO)/rehearsal.h5
	$(BIN)/deeprx-service eval --model models/small --data $(DEMO)/train-mix.h5 --plot $(DEMO)/train-mix.png
	$(BIN)/deeprx-service eval --model models/small --data $(DEMO)/drift-highspeed.h5 --plot $(DEMO)/drift-highspeed.png
	printf '[adaptation]\npool = "$(DEMO)/pool.h5"\nregression = "$(DEMO)/train-mix.h5"\nrehearsal = "$(DEMO)/rehearsal.h5"\nmin_target_slots = 64\n' > $(DEMO)/server.toml
	$(BIN)/deeprx-service serve --model models/small --store $(DEMO)/store --port $(DEMO_PORT) \
	    --metrics-port $(DEMO_METRICS_PORT) --config $(DEMO)/server.toml > $(DEMO)/server.log 2>&1 & server=$$!; status=0; \
	$(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/drift-highspeed.h5 --slots 256 \
	    --streams 4 --context drift-highspeed --prefix labelled || status=$$?; \
	$(BIN)/deeprx-client targets --server 127.0.0.1:$(DEMO_PORT) || status=$$?; \
	for phase in before after; do \
	    if [ $$phase = after ]; then \
	        $(BIN)/deeprx-client adapt --server 127.0.0.1:$(DEMO_PORT) --context drift-highspeed --wait || status=$$?; \
	    fi; \
	    echo "== $$phase adaptation: unseen slots of the target context (drift-highspeed)"; \
	    $(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/drift-check.h5 --feedback none \
	        --streams 4 --context drift-highspeed --prefix check-$$phase || status=$$?; \
	    echo "== $$phase adaptation: a non-target context (training mix)"; \
	    $(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/train-mix.h5 --slots 256 \
	        --feedback none --streams 4 --context cell-7 --prefix mix-$$phase || status=$$?; \
	done; \
	$(BIN)/deeprx-client models --server 127.0.0.1:$(DEMO_PORT) || status=$$?; \
	$(BIN)/python -c "import urllib.request as u; print(*[l for l in u.urlopen('http://127.0.0.1:$(DEMO_METRICS_PORT)/metrics').read().decode().splitlines() if l.startswith(('deeprx_context_ber', 'deeprx_model_info', 'deeprx_scoped_version_info', 'deeprx_adaptation_jobs_total'))], sep='\n')" || status=$$?; \
	kill -TERM $$server; wait $$server || status=$$?; exit $$status

# Tests use a real Prometheus (Debian's package), installed here when missing.
test: $(STAMP)
	command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	    || echo "could not install prometheus: its tests will skip (outside CI) or fail (CI)"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)

# Regenerate the gRPC/protobuf Python code (checked in; tests/test_proto.py fails when stale).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/receiver.proto
