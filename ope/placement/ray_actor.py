"""The node side of a model placed on Ray: an actor that loads the package with ope's local
``load`` and serves calls through it, so the model runs in an ope worker on that node.

The actor is threaded (``max_concurrency``): calls run in parallel threads into the node's
ope model, which orders and supervises them, and ``health``/``stats``/``close`` never wait
behind a stuck call. Deadlines, crashes of the node's worker and its memory limit are the
node's ope's business (its kill ladder, its restart policy); their errors travel back
unchanged.

The package arrives either as a path the node sees (checked: same manifest digest as the
host's copy) or as its files through the object store, written to a private folder and read
(manifests and hashes verified) with ``ope.package.read_package``.
"""

import os
import shutil
import tempfile

from ope.errors import EnvError, PackageError
from ope.package import read_package

__all__ = ["ModelActor", "package_files"]


def package_files(path):
    """``{relative path: bytes}`` of every file of the package folder at ``path``."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as file:
                files[os.path.relpath(full, path)] = file.read()
    return files


class ModelActor:
    """One placed replica. ``local_load`` is ``ope.load`` itself, handed over by the host
    (ope.api imports this layer, so this layer cannot import it back)."""

    def __init__(self, local_load):
        self._local_load = local_load
        self._model = None
        self._folder = None  # where shipped files were written, removed at close

    def where(self):
        """The node this actor runs on, and its process."""
        import ray
        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "actor_pid": os.getpid()}

    def open(self, path, digest, files, options):
        """Load the package (``files``, else the node's ``path``) with ``options``. Returns
        False, loading nothing, when only ``path`` came and the node does not see the same
        package there: the host then sends the files."""
        if files is None:
            try:
                package = read_package(path)
            except PackageError:
                return False
            if package.manifest_digest != digest:
                return False
        else:
            self._folder = tempfile.mkdtemp(prefix="ope-package-")
            target = os.path.join(self._folder, os.path.basename(os.path.normpath(path)))
            for name, data in files.items():
                os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
                with open(os.path.join(target, name), "wb") as file:
                    file.write(data)
            package = read_package(target)
            if package.manifest_digest != digest:
                raise PackageError(f"package {package.name!r}: the files sent to the node do "
                                   f"not match the host's manifest")
        self._model = self._local_load(package.path, placement="local", out_of_process=True,
                                       **_node_device(options))
        return True

    def infer(self, arrays, timeout_s):
        return self._model.infer(arrays, timeout_s=timeout_s)

    def stats(self):
        return self._model.stats()

    def health(self):
        return self._model.health()

    def close(self):
        try:
            if self._model is not None:
                self._model.close()
        finally:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None


def _node_device(options):
    """``options`` with ``device="cuda"`` turned into the GPU Ray assigned this actor: the
    node's ope then shows that GPU alone to the worker."""
    device = options.get("device")
    if device is None or not str(device).startswith("cuda"):
        return options
    import ray
    gpus = ray.get_gpu_ids()
    if not gpus:
        raise EnvError(f"device={device!r}: Ray assigned this actor no GPU (ask for one with "
                       f"RayPlacement(num_gpus=1))")
    return {**options, "device": f"cuda:{gpus[0]}"}
