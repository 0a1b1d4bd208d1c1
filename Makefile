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
# offline; then serve it, stream the drift condition with genie feedback, ask the service to adapt
# to it (first-order influence-guided update from a simulated pool), and stream it again.
# The gate here tolerates 0.5 points of training-mix BER for the drift gain (default 0.2): the small
# model does not learn 150 m/s Doppler without losing some low-speed accuracy (README, adaptation).
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
	printf '[adaptation]\npool = "$(DEMO)/pool.h5"\nregression = "$(DEMO)/train-mix.h5"\nrehearsal = "$(DEMO)/rehearsal.h5"\nmin_target_slots = 64\nmax_regression = 0.005\n' > $(DEMO)/server.toml
	$(BIN)/deeprx-service serve --model models/small --store $(DEMO)/store --port $(DEMO_PORT) \
	    --metrics-port $(DEMO_METRICS_PORT) --config $(DEMO)/server.toml > $(DEMO)/server.log 2>&1 & server=$$!; status=0; \
	$(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/drift-highspeed.h5 --slots 256 \
	    --streams 4 --context drift-highspeed --prefix labelled || status=$$?; \
	echo "== unseen drift slots before adaptation"; \
	$(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/drift-check.h5 \
	    --streams 4 --context check-before --prefix before || status=$$?; \
	$(BIN)/deeprx-client targets --server 127.0.0.1:$(DEMO_PORT) || status=$$?; \
	$(BIN)/deeprx-client adapt --server 127.0.0.1:$(DEMO_PORT) --context drift-highspeed --method first-order \
	    --wait || status=$$?; \
	echo "== the same unseen drift slots after adaptation"; \
	$(BIN)/deeprx-client stream --server 127.0.0.1:$(DEMO_PORT) --data $(DEMO)/drift-check.h5 \
	    --streams 4 --context check-after --prefix after || status=$$?; \
	$(BIN)/python -c "import urllib.request as u; print(*[l for l in u.urlopen('http://127.0.0.1:$(DEMO_METRICS_PORT)/metrics').read().decode().splitlines() if l.startswith(('deeprx_context_ber', 'deeprx_model_info', 'deeprx_adaptation_jobs_total'))], sep='\n')" || status=$$?; \
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
