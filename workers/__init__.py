"""The worker process's entry point (worker.py): it serves one model over the bridge with the
runners of ope.runners. Nothing in ope imports it; the host starts it as a program."""
