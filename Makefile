# The everyday commands. Each one creates .venv and installs what it needs first.
.PHONY: run test demo bench lint

run:    ## run the service and its worker (gunicorn on 127.0.0.1:8000, SQLite in data/)
	scripts/run

test:   ## run the test suite (SQLite, and PostgreSQL where it answers)
	scripts/test

demo:   ## a TWIN simulator + the receiver + a small mailing, ending with the recipe's table
	scripts/bootstrap requirements.txt && .venv/bin/python -m receiver.demo

bench:  ## the benchmarks, printing their figures (see README, "Performance and reliability")
	scripts/bootstrap requirements-dev.txt && .venv/bin/python -m bench

lint:
	scripts/bootstrap requirements-dev.txt && .venv/bin/ruff check receiver tests bench
