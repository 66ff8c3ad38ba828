"""The host side: the Model handle both modes implement (model.py), the in-process mode
(in_process.py), and the out-of-process mode: the model (out_of_process.py), its calls in
flight (calls.py), its worker's lifecycle (lifecycle.py), the worker processes themselves
(worker_process.py), their supervision (supervisor.py), and N workers behind one handle
(replicas.py).
"""
