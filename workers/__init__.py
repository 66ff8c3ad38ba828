"""Code that runs inside worker processes: the runners each model kind uses (and, with
the out-of-process mode, the worker's entry point). Depends on nothing host-only."""
